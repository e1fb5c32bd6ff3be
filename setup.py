# The C part (csrc/) is compiled by cffi when the package is built; everything else is in
# pyproject.toml. setuptools needs this file only for the `cffi_modules` hook.
from setuptools import setup

setup(cffi_modules=["gfvm/_build_native.py:ffibuilder"])
