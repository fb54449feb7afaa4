"""Ship the repository's base-config.yaml inside the encstate_bot package of the wheel.

Everything else about the package is in pyproject.toml. maubot's .mbp wants base-config.yaml
at its root (maubot.yaml `extra_files`), so the file at the repository root stays the only
copy in git; the build copies it to encstate_bot/base-config.yaml, where encstate_bot/config.py
looks first. An editable install needs no copy: the package then lives in the checkout.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

BASE_CONFIG = "base-config.yaml"


class BuildPyWithBaseConfig(build_py):
    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            target = os.path.join(self.build_lib, "encstate_bot", BASE_CONFIG)
            self.mkpath(os.path.dirname(target))
            self.copy_file(BASE_CONFIG, target, preserve_mode=False)

    def get_source_files(self) -> list[str]:
        # sdist takes its file list from here: the wheel built from the sdist needs the file too.
        return [*super().get_source_files(), BASE_CONFIG]


setup(cmdclass={"build_py": BuildPyWithBaseConfig})
