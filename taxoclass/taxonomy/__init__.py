"""The taxonomic tree, annotation files, their validation and label encoding."""
