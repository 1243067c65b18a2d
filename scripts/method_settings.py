"""Write conf/method/settings/<Class>.yaml, every setting of each class of gnp.methods at its constructor's
default, which conf/method/*.yaml build on: run it after changing a constructor's settings or defaults
(a test says when a file is out of date).

    python scripts/method_settings.py
"""
from __future__ import annotations

from gnp.config import method_class_names, settings_file
from gnp.paths import CONF_DIR

SETTINGS_DIR = CONF_DIR / "method" / "settings"


def main() -> None:
    SETTINGS_DIR.mkdir(exist_ok=True)
    for name in method_class_names():
        (SETTINGS_DIR / f"{name}.yaml").write_text(settings_file(name))
        print(f"wrote {(SETTINGS_DIR / name).relative_to(CONF_DIR.parent)}.yaml")


if __name__ == "__main__":
    main()
