"""Artifacts that run on their target without kernelize's compiler (no torch, onnxscript or
``kernelize.api``): write/verify/load them (:mod:`.artifact`), pack them into one file
(:mod:`.archive`), run them locally (:mod:`.runner`) and on a device over TVM RPC
(:mod:`.remote`, imported on use). :mod:`.export` writes one from a compiled model (it needs
the compiler, so it is imported on use too)."""

from kernelize.deploy.archive import pack, unpack  # noqa: F401
from kernelize.deploy.artifact import Artifact, describe_target, load, verify, write  # noqa: F401
from kernelize.deploy.runner import Runner  # noqa: F401
