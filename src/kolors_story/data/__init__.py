"""The style dataset: its sources (a local folder, a ModelScope dataset), its text files and
rows, the Data-Juicer filtering, images (decoding, EXIF, transparency, grids), the training folder
it becomes, and the demo dataset.

Imports only the shared modules at the package root (errors, files): no model, no workflow.
"""
