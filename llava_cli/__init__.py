"""llava-cli: ask local LLaVA vision-language models about images.

The command line (`llava`) is a thin layer over this package; everything it does is callable from Python.
"""

__version__ = "0.1.0"
