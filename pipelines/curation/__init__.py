"""Curation: from a huge general corpus to the documents a domain needs (select, embed, index, retrieve)."""
