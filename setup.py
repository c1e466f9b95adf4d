"""Ships the repository's configs/ and data/ in the wheel as ``seka_lightning/shipped/`` (read by
``seka_lightning.resources``) without a second copy in git: ``build_py`` copies them into the build tree.

Everything else is declared in pyproject.toml; MANIFEST.in puts the same files in the sdist, so a wheel built from
the sdist (``python -m build``) ships them too.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# the same folders and patterns as seka_lightning.resources.SHIPPED_FILES
SHIPPED_FILES = {"configs": ("*.yaml", "*.json"), "data": ("*.jsonl",)}


class BuildPyWithShippedFiles(build_py):
    """build_py that also copies configs/ and data/ under the package (an editable install reads the checkout)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for folder, patterns in SHIPPED_FILES.items():
            for source in sorted({path for pattern in patterns for path in (ROOT / folder).rglob(pattern)}):
                target = Path(self.build_lib, "seka_lightning", "shipped", source.relative_to(ROOT))
                self.mkpath(str(target.parent))
                self.copy_file(str(source), str(target))


setup(cmdclass={"build_py": BuildPyWithShippedFiles})
