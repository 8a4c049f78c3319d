"""torch.compile's on-disk cache, kept apart per CPU kernel set: a leaf module (imports nothing of maskkit).

Inductor caches its compiled C++ (and a precompiled header) under one folder whatever `ATEN_CPU_CAPABILITY`
says, so a process run with `ATEN_CPU_CAPABILITY=default` after one with the native kernels (`make test-kernels`
does exactly that) reuses a header built for another instruction set and fails to compile ("'at::vec' has not
been declared"). When the capability is set and the user has not chosen a cache folder, each capability gets its
own (read at every compilation, so setting it just before one is enough).
"""

import getpass
import os
import tempfile


def separate_cache_per_kernel_set() -> str | None:
    """Point TORCHINDUCTOR_CACHE_DIR at a folder of this ATEN_CPU_CAPABILITY (if set and the cache folder is not
    chosen already); returns the folder set, else None."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if not capability:
        return None
    # Inductor writes its default folder into TORCHINDUCTOR_CACHE_DIR the first time it looks (importing some
    # libraries does), so only another value there is the user's choice.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return None
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    folder = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}_{capability}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder
