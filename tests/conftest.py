"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA SPMD warnings about embedding gathers



def pytest_collection_modifyitems(items):
    """Modules with slow tests first, each module kept whole (its module-scoped fixtures are
    built once): with one pytest-xdist worker per core, the minute-long tests start early
    instead of ending the run one at a time."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)
