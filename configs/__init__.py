"""The config files moved into the package (cbir_tf/configs/) so that installed commands find
them. This alias keeps `from configs import demo` working in a checkout: it loads the same files.
`--config=configs/<name>.py` keeps working too (the commands resolve it to the shipped file)."""

from cbir_tf import configs as _shipped

__path__ = list(_shipped.__path__)
