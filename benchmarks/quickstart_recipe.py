"""The quickstart's cross-entropy recipe, read from launch/quickstart.sh, so a benchmark of "the
quickstart's model" measures what the script trains, whatever the script says today.

    from quickstart_recipe import cross_entropy_settings   # {"units": 128, ...}
"""

from __future__ import annotations

import os
import shlex

from dist_caption.config import TrainConfig
from serving import declaring

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch",
                      "quickstart.sh")


def cross_entropy_settings(script: str = SCRIPT) -> dict:
    """The `TrainConfig` settings that the first `launch/train.sh` command of `script` sets,
    typed as the config declares them; flags whose value is a shell variable (the run folder,
    `"$@"`) and the launcher's own options are left out."""
    with open(script) as f:
        text = f.read().replace("\\\n", " ")
    command = next((line for line in text.splitlines()
                    if line.lstrip().startswith("bash launch/train.sh")), None)
    if command is None:
        raise ValueError(f"{script}: no `bash launch/train.sh` command")
    kinds = {f.name: f.metadata["kind"] for f in declaring.settings(TrainConfig)}
    words = shlex.split(command, comments=True)
    settings = {}
    for flag, value in zip(words, words[1:]):
        name = flag[2:]
        if flag.startswith("--") and kinds.get(name) in (int, float, str) and "$" not in value:
            settings[name] = kinds[name](value)
    if not settings:
        raise ValueError(f"{script}: its first `bash launch/train.sh` sets no training setting")
    return settings
