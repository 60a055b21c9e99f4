"""Memory readings of the current process (Linux /proc), shared by the benchmark scripts."""


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` field in MB: ``VmRSS`` (now) or ``VmHWM`` (peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Writing 5 to clear_refs resets VmHWM, so the next peak covers only what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
