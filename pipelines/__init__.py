"""What is done: one module per stage, the recipe schema and the stage runner. Imports ``actors``, never ``cluster``."""
