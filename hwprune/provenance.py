"""What a study was made of, stored in the study as content, not paths.

The search space and every device profile are kept as their YAML text and sha256, so a study resumes or exports on
another machine (where those paths do not exist), and a file edited since the study began is noticed: a changed
search space or profile would silently change what the study's trials mean, so a resume refuses it unless the
user says ``--allow-changed-config``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from hwprune.errors import RunError

SPACE_ATTR, PROFILES_ATTR = "search_space_file", "profile_files"
OVERRIDE_FLAG = "--allow-changed-config"


def file_record(source: Optional[str], name: str) -> Dict[str, str]:
    """{"name", "source", "sha256", "text"} of one YAML file (text empty where it has no file)."""
    text = Path(source).read_text() if source and Path(source).is_file() else ""
    return {"name": name, "source": source or "", "sha256": hashlib.sha256(text.encode()).hexdigest(), "text": text}


def records(space, profiles: Sequence) -> Dict[str, object]:
    return {SPACE_ATTR: file_record(space.source, space.name),
            PROFILES_ATTR: [file_record(p.source, p.name) for p in profiles]}


def check_unchanged(stored: Dict[str, object], current: Dict[str, object], allow_changed: bool) -> List[str]:
    """Refuse (RunError) a search space or profile whose content differs from the study's; with ``allow_changed``
    return the differences as lines to report instead."""
    diffs = []
    old_space, new_space = stored.get(SPACE_ATTR), current[SPACE_ATTR]
    if old_space and old_space["sha256"] != new_space["sha256"]:
        diffs.append(f"search space {new_space['source'] or new_space['name']} (sha256 {old_space['sha256'][:12]} in "
                     f"the study, {new_space['sha256'][:12]} now)")
    old_profiles = {p["name"]: p for p in stored.get(PROFILES_ATTR) or []}
    for p in current[PROFILES_ATTR]:
        old = old_profiles.get(p["name"])
        if old is not None and old["sha256"] != p["sha256"]:
            diffs.append(f"device profile {p['source'] or p['name']} (sha256 {old['sha256'][:12]} in the study, "
                         f"{p['sha256'][:12]} now)")
    if diffs and not allow_changed:
        raise RunError(f"{'; '.join(diffs)} changed since the study was created, which would change what its trials "
                       f"mean; restore the file, use a new --study, or pass {OVERRIDE_FLAG} to resume anyway")
    return diffs


def stored_search_space(attrs: Dict[str, object]):
    """The study's search space parsed from its stored text (None for a study made before it was stored)."""
    from hwprune.config import parse_search_space

    rec = attrs.get(SPACE_ATTR)
    if not rec or not rec.get("text"):
        return None
    return parse_search_space(yaml.safe_load(rec["text"]) or {}, name=rec["name"],
                              source=f"{rec['source'] or rec['name']} (as stored in the study)")
