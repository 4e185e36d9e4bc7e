"""Build script: the pure-Python package, plus the optional C++/CUDA extension ``lora_kernels._C``.

The extension part is filled in by the csrc work; without it this installs the Python package alone.
"""

from setuptools import setup

setup()
