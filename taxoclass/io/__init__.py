"""Files, images, provenance and schemas: the bottom layer every other part uses."""
