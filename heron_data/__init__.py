"""Datasets for the server, the exporter and the fleet: loaders, partitioning, text.

Torch-free: the registry (`datasets`), image and array formats (`images`), GLUE-style text
and the MiniLM file locator (`text`), and the split of a dataset into device shards
(`partition`). The device runtime reads shards with `edge_runtime.data` and never imports this.
"""
