"""Where the authors' reference vectors live: `shared/reference_vectors` beside the repository."""
import json
import os
import pathlib

import pytest

VECTORS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference_vectors"
needs_vectors = pytest.mark.skipif(not (VECTORS / "manifest.json").is_file(),
                                   reason=f"reference vectors not found at {VECTORS} (shared/ beside the repository)")


def quantizer_cases() -> list:
  """The names of the release's quantizer unit cases (none when the vectors are absent)."""
  if not (VECTORS / "manifest.json").is_file():
    return []
  return sorted(json.loads((VECTORS / "manifest.json").read_text())["quantizer_cases"])

# The binarizer zoo's vectors (issue 17): `BIPFT_ZOO_VECTORS` names another set of the same format.
ZOO_VECTORS = pathlib.Path(os.environ.get("BIPFT_ZOO_VECTORS", VECTORS.parent / "zoo_vectors"))
needs_zoo_vectors = pytest.mark.skipif(not (ZOO_VECTORS / "manifest.json").is_file(),
                                       reason=f"zoo vectors not found at {ZOO_VECTORS} (BIPFT_ZOO_VECTORS)")
