"""`moelora demo`: the main job on a built-in default, with no downloads."""
