"""How this rnnattn_ext was built and what it can run on: ``python -m rnnattn_ext.info``.

Prints the library version, the torch it was built against and the running one, whether the CUDA
kernels were built (and for which architectures), which build of the CPU kernels runs (avx512, avx2
or baseline: the best the CPU supports, or the one RNNATTN_CPU_KERNELS names), every visible GPU
with its compute capability and whether the build can run on it, the path of the compiled library
and the registered operators.
"""

from __future__ import annotations

import torch

from . import __version__, _ops, library_path


def cuda_architectures() -> list[str]:
    """The CUDA architectures of the build, as CMake names them ("80-real": code for sm_80 only;
    "90": code for sm_90 plus PTX that newer GPUs compile on load); empty without CUDA."""
    text = getattr(_ops._C, "cuda_architectures", "") or ""
    return [a for a in text.replace(";", ",").split(",") if a]


def gpu_supported(capability: tuple[int, int], architectures: list[str] | None = None) -> bool:
    """Whether a GPU of this compute capability can run the build: code for the same major version and
    a minor version at most its own, or PTX for a capability at most its own."""
    architectures = cuda_architectures() if architectures is None else architectures
    for arch in architectures:
        name, _, kind = arch.partition("-")
        digits = name.rstrip("af")  # "90a": code for exactly that GPU generation's features
        if not digits.isdigit():
            continue
        built = (int(digits) // 10, int(digits) % 10)
        if digits != name:
            if built == tuple(capability):
                return True
            continue
        if built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if kind != "real" and built <= tuple(capability):  # PTX
            return True
    return False


def registered_ops() -> list[str]:
    """The operators of the rnnattn namespace known to the dispatcher."""
    prefix = "rnnattn::"
    return sorted(name[len(prefix):] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix))


def _or_reason(query) -> str:
    """query()'s answer, or, where a bad setting makes it raise, why (the report says so instead of
    failing, as every CPU call would)."""
    try:
        return query()
    except RuntimeError as error:
        return f"none: {str(error).splitlines()[0]}"


def cpu_kernels() -> str:
    """The build of the CPU kernels that runs, or why none can (a bad RNNATTN_CPU_KERNELS)."""
    return _or_reason(_ops._C.cpu_kernels)


def cpu_bf16_products() -> bool:
    """Whether a bfloat16 layer's products on the CPU run in bfloat16 (a CPU with AVX512-BF16 and the
    avx512 build of the kernels), with float32 sums; else they run in float32."""
    return bool(_ops._C.cpu_bf16_products())


def cpu_threads() -> str:
    """How many threads a CPU layer may run on: torch's thread count, bounded by the CPUs this process
    can use (affinity, cgroup quota, or RNNATTN_CPU_MAX_THREADS), or why it cannot run (a bad value)."""
    def bound() -> str:
        usable, threads = _ops._C.usable_cpus(), torch.get_num_threads()
        return (f"at most {min(threads, usable)} (torch.get_num_threads() {threads}; this process can keep "
                f"{usable} CPU{'s' if usable != 1 else ''} busy)")
    return _or_reason(bound)


def report() -> str:
    built = _ops._C.built_with_torch
    lines = [
        f"rnnattn_ext {__version__}",
        f"torch: built against {built}, running {torch.__version__}",
        f"library: {library_path()}",
        f"CPU kernels: {cpu_kernels()}",
        "CPU products of bfloat16 layers: "
        + _or_reason(lambda: "bfloat16 (AVX512-BF16), float32 sums" if cpu_bf16_products() else "float32"),
        f"CPU threads per layer: {cpu_threads()}",
    ]
    if _ops._C.cuda_built:
        lines.append(f"CUDA kernels: built with CUDA {_ops._C.cuda_version} for {', '.join(cuda_architectures())}")
    else:
        lines.append("CUDA kernels: not built (CPU only)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lines.append(f"GPUs visible: {count}")
    for index in range(count):
        capability = torch.cuda.get_device_capability(index)
        if not _ops._C.cuda_built:
            verdict = "not usable: this build has no CUDA kernels"
        elif gpu_supported(capability):
            verdict = "supported"
        else:
            verdict = "not supported by this build: rebuild with RNNATTN_CUDA_ARCHS including it"
        lines.append(f"  cuda:{index} {torch.cuda.get_device_name(index)}, compute capability "
                     f"{capability[0]}.{capability[1]}: {verdict}")
    ops = registered_ops()
    lines.append(f"operators ({len(ops)}): " + ", ".join(f"torch.ops.rnnattn.{name}" for name in ops))
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
