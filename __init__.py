"""domainsynth: adapt LLMs to a specialised domain when in-domain data is scarce (TRAIT, CRAFT, DOMINO) on Ray.

The package's rooms are the repository's top-level folders: ``cluster`` (where work runs), ``pipelines`` (what is
done) and ``actors`` (how it is done on a node). Imports point one way: cluster -> pipelines -> actors.
"""

__version__ = "0.1.0"
