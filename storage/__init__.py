"""The stored-dataset format and safe file writing, shared by `convert/` and `pipelines/`.

What the writing side and the reading side must agree on lives here once, below both of them:
`beton` (the `.beton` layout and its numpy reader), `metadata` (the `.json` beside it: schema,
builder, reader and checks), `folders` (how an image folder is listed), `atomic` (writes that
never leave half a file) and `forking` (the guard around code that forks worker processes).
The submodules import nothing from `ssat`, `pipelines` or `convert`, and this file imports none
of them, so `import storage.atomic` costs no image library.
"""


class DatasetError(Exception):
    """A dataset that cannot be read as expected (a .beton, its metadata, an image folder); the
    message names the file and what was expected."""
