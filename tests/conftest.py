"""Shared pytest setup: makes `jetformer_test_utils` importable everywhere."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
