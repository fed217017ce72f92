"""Artifacts that run on their target without kernelize's compiler (no torch, onnxscript or
``kernelize.api``): write/verify/pack them (:mod:`.artifact`), run them locally
(:mod:`.runner`) and on a device over TVM RPC (:mod:`.remote`, imported on use)."""

from kernelize.deploy.artifact import Artifact, describe_target, load, pack, unpack, verify, write  # noqa: F401
from kernelize.deploy.runner import Runner  # noqa: F401
