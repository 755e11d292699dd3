import torch

# Tiny models: intra-op threads cost more than they give. The 6-step CoBa resume run of
# tests/train/test_resume.py took 6.2 s CPU / 12.3 s wall with torch's default 2 threads on the shared
# 2-core machine, 0.6 s / 1.2 s with one.
torch.set_num_threads(1)

pytest_plugins = ["tests.helpers.fixtures", "tests.helpers.fault_fixtures"]
