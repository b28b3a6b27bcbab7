"""Every result JSON says what made it: commit, tree state, command, versions, device, input hashes."""

from __future__ import annotations

import hashlib
import json

from oneword.eval.report import write_report
from oneword.provenance import provenance


def test_provenance_names_commit_versions_device_and_input_hashes(tmp_path):
    enc = tmp_path / "enc.safetensors"
    enc.write_bytes(b"encoder bytes")
    image = tmp_path / "a.png"
    image.write_bytes(b"image bytes")
    p = provenance({"concepts": [image]}, encoder=enc)
    assert p["commit"] is None or len(p["commit"]) == 40  # None only outside a git checkout
    assert p["dirty"] in (True, False, None) and p["versions"]["torch"] and p["device"]["cpu_count"] >= 1
    assert p["inputs"]["concepts"][str(image)] == hashlib.sha256(b"image bytes").hexdigest()
    assert p["encoder"] == {"file": "enc.safetensors", "sha256": hashlib.sha256(b"encoder bytes").hexdigest()}


def test_reports_carry_provenance(tmp_path):
    rows = [{"method": "scratch", "concept": "c", "steps": 0, "seconds": 1.0, "recon_clip": 0.5}]
    write_report(rows, tmp_path)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {"commit", "dirty", "argv", "versions", "device"} <= set(doc["provenance"])
