"""The ops of the per-frame step, one file each: its Triton kernel(s), their launcher
(`<op>_triton`), its torch reference (`<op>_ref`, the definition of what the op computes) and
the op itself (`<op>`), which runs the kernel for tensors on a GPU and the reference elsewhere
(`use_triton(False)` or PPX_TRITON=0: the references everywhere). The matrix products are the
`products` subpackage. Import an op from its file (`from engine.kernels.rms_norm import
rms_norm`): the package does not re-export them, so a file's name always names the file."""
from .common import triton_enabled, triton_on_cpu, use_triton  # noqa: F401
