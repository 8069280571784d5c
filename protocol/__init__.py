"""What crosses process boundaries: message structs, their codec, socket helpers.

Imports neither torch model code nor FastAPI, so every process can use it.
"""
