"""Offline converters: one small script per source dataset, writing `<name>_<split>.beton` and the
`<name>_<split>.json` metadata that the loaders and the trainer read."""
