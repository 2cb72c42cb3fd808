"""Launch an xtrain job on Ray workers (local instance or an existing cluster).

    python launch/ray_launch.py strategy=dp ray.num_workers=4 [xtrain overrides]
    python launch/ray_launch.py strategy=dp ray.num_workers=8 ray.address=auto ray.use_gpu=true

The logic lives in xtrain/ray_launcher.py; see launch/README.md.
"""

import sys

from xtrain.ray_launcher import main

if __name__ == "__main__":
    sys.exit(main())
