"""Passes over the IR: canonicalize, fuse, verify, and the recipes that order them."""
