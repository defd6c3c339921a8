"""The fine-tuned adapter on disk: the file layout of ``final_model/`` and of a package, the one
reader of adapter directories, and the package archive format (write, verify, extract)."""
