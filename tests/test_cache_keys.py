"""Cache keys change exactly when a result could: each ingredient changes the key of its node
(and of the nodes downstream), and nothing else does."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import sys
import textwrap
import time

import pytest

import stages
from artifacts import filehash
from conftest import GRAPHS
from runtime import code_identity
from runtime.graph import load_graph
from runtime.run import RunContext
from runtime.shards import iter_shards
from stages.heatmaps import MaskHeatmap, SamplePatches

ORACLE = GRAPHS / "oracle_heatmap.yaml"
SMALL = ["dataset.num_images=6", "shard_size=8"]
ALL = {"image", "oracle", "points", "enhance", "patches", "metrics", "enhanced_metrics"}


def keys_of(overrides=(), graph=ORACLE, device="cpu", shard_index=0):
    g = load_graph(graph, [*SMALL, *overrides])
    ctx = RunContext(g, "/nonexistent", None, set(), device=device)
    shard = list(iter_shards(g.source, g.shard_size))[shard_index]
    return ctx.keys(shard)


def changed(a, b):
    return {n for n in a if a[n] != b.get(n)}


@pytest.fixture
def base():
    return keys_of()


def test_stage_name_version_params_weights_dtype_and_wiring(base, monkeypatch):
    assert keys_of() == base
    with monkeypatch.context() as m:
        m.setattr(SamplePatches, "name", "sample_patches_renamed")
        assert changed(base, keys_of()) == {"patches"}
    with monkeypatch.context() as m:
        m.setattr(SamplePatches, "version", "999")
        assert changed(base, keys_of()) == {"patches"}
    assert changed(base, keys_of(["points.num_points=3"])) == {"points", "enhance", "patches", "enhanced_metrics"}
    with monkeypatch.context() as m:
        m.setattr(MaskHeatmap, "weights_fingerprint", lambda self: "other weights")
        assert changed(base, keys_of()) == ALL - {"image"}
    with monkeypatch.context() as m:
        m.setattr(SamplePatches, "compute_dtype", lambda self: "bfloat16")
        assert changed(base, keys_of()) == {"patches"}
    assert changed(base, keys_of(["metrics.inputs.heatmap=enhance.heatmap"])) == {"metrics"}


def test_device_counts_only_for_model_stages():
    g_cpu, g_gpu = keys_of(graph=GRAPHS / "pnp_vqa.yaml"), keys_of(graph=GRAPHS / "pnp_vqa.yaml", device="cuda")
    # GPU stages and what they feed change; image decoding and preprocessing do not
    assert changed(g_cpu, g_gpu) == {"gradcam", "caption", "answer", "accuracy", "heatmap_quality"}
    assert keys_of(device="cuda") == keys_of()  # a graph without model stages


def test_library_versions_count_only_where_they_are_imported(base, monkeypatch):
    real = code_identity._distribution_version

    def fake(bumped):
        def version(names):
            return "999.0" if names[0] == bumped else real(names)
        return version

    code_identity._library_versions.cache_clear()
    with monkeypatch.context() as m:
        m.setattr(code_identity, "_distribution_version", fake("torch"))
        code_identity._library_versions.cache_clear()
        assert changed(base, keys_of()) == set()  # no stage of this graph imports torch
        torch_graph = keys_of(graph=GRAPHS / "pnp_vqa.yaml")
    code_identity._library_versions.cache_clear()
    assert changed(torch_graph, keys_of(graph=GRAPHS / "pnp_vqa.yaml")) == {
        "gradcam", "caption", "answer", "accuracy", "heatmap_quality"}
    with monkeypatch.context() as m:
        m.setattr(code_identity, "_distribution_version", fake("numpy"))
        code_identity._library_versions.cache_clear()
        assert changed(base, keys_of()) == ALL
    with monkeypatch.context() as m:
        m.setattr(code_identity, "_distribution_version", fake("pillow"))
        code_identity._library_versions.cache_clear()
        # what depends on the decoded image (the oracle heatmap is made from the mask alone)
        assert changed(base, keys_of()) == {"image", "points", "enhance", "patches", "enhanced_metrics"}
    code_identity._library_versions.cache_clear()


def test_real_stage_code_reaches_its_model_modules():
    ident = code_identity.code_identity(stages.STAGES["itm_gradcam"])
    assert {"stages.blip", "models.blip.med", "models.blip.vit", "models.blip.checkpoint", "models.weights",
            "runtime.node_runner"} <= set(ident.modules)
    assert "stages.heatmaps" not in ident.modules and "stages" not in ident.modules  # not every stage
    assert {"torch", "transformers", "timm"} <= dict(ident.libraries).keys()
    assert "torch" not in dict(code_identity.code_identity(stages.STAGES["heatmap_points"]).libraries)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A stage in its own package (as a user's plugin) whose module imports a helper module."""
    pkg = tmp_path / "keyplug"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("SCALE = 1.0\n")
    (pkg / "stage.py").write_text(textwrap.dedent('''
        """A plugin stage."""
        from keyplug import helper
        from stages.heatmaps import SamplePatches

        class PluginPatches(SamplePatches):
            name = "plugin_patches"

            def process(self, batch):
                return super().process(batch)
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module("keyplug.stage")
    monkeypatch.setitem(stages.STAGES, "plugin_patches", module.PluginPatches)
    yield pkg
    for name in ("keyplug", "keyplug.stage", "keyplug.helper"):
        sys.modules.pop(name, None)


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_code_changes_change_the_key_comments_do_not(plugin, write_graph):
    graph = write_graph(f"""
        extends: {ORACLE}
        nodes:
          patches: {{stage: plugin_patches, inputs: {{heatmap: enhance.heatmap}}}}
        """)
    base = keys_of(graph=graph)
    _edit(plugin / "stage.py", '"""A plugin stage."""', '"""A plugin stage, documented better."""\n# a comment')
    assert keys_of(graph=graph) == base  # docstrings and comments do not change numbers
    _edit(plugin / "stage.py", "return super().process(batch)", "out = super().process(batch)\n        return out")
    edited = keys_of(graph=graph)
    assert changed(base, edited) == {"patches"}
    _edit(plugin / "helper.py", "SCALE = 1.0", "SCALE = 2.0")  # a module the stage imports
    assert changed(edited, keys_of(graph=graph)) == {"patches"}


def test_weights_fingerprint_reads_the_whole_file_once(tmp_path, monkeypatch):
    monkeypatch.setenv(filehash.MEMO_ENV, str(tmp_path / "memo.sqlite3"))
    from models.weights import file_fingerprint

    path = tmp_path / "w.bin"
    data = bytearray(os.urandom(3 << 20))
    path.write_bytes(bytes(data))
    first = file_fingerprint(path)
    reads = []
    real = filehash._hash_file
    monkeypatch.setattr(filehash, "_hash_file", lambda p: reads.append(p) or real(p))
    filehash._MEMO.local.clear()
    assert file_fingerprint(path) == first and reads == []  # from the memo on disk
    data[len(data) // 2] ^= 1  # one bit in the middle: the old fingerprint read only the ends
    path.write_bytes(bytes(data))
    assert file_fingerprint(path) != first and len(reads) == 1


def _rewrite_keeping_mtime(path, text):
    """Rewrite ``path`` in place with as many bytes and put its modification time back (as
    ``cp -p``, ``rsync -t`` or an editor's "keep timestamps" do)."""
    st = os.stat(path)
    assert len(text.encode()) == st.st_size
    time.sleep(0.05)  # past the clock tick of the file's change time (a few ms; docs/store.md)
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size


def test_edits_with_the_mtime_put_back_change_the_key(plugin, write_graph, tmp_path, monkeypatch):
    monkeypatch.setenv(filehash.MEMO_ENV, str(tmp_path / "memo.sqlite3"))
    image = tmp_path / "image.png"
    image.write_text("first picture")
    assert filehash.file_sha256(image) == hashlib.sha256(b"first picture").hexdigest()
    _rewrite_keeping_mtime(image, "other picture")
    filehash._MEMO.local.clear()  # as a new process would: from the memo on disk
    assert filehash.file_sha256(image) == hashlib.sha256(b"other picture").hexdigest()

    graph = write_graph(f"""
        extends: {ORACLE}
        nodes:
          patches: {{stage: plugin_patches, inputs: {{heatmap: enhance.heatmap}}}}
        """)
    base = keys_of(graph=graph)
    _rewrite_keeping_mtime(plugin / "helper.py", "SCALE = 2.0\n")  # a module the stage imports
    filehash._MEMO.local.clear()
    assert changed(base, keys_of(graph=graph)) == {"patches"}


def test_a_memo_file_of_the_version_without_change_times_is_not_read(tmp_path, monkeypatch):
    memo = tmp_path / "old-memo.sqlite3"
    monkeypatch.setenv(filehash.MEMO_ENV, str(memo))
    image = tmp_path / "image.png"
    image.write_text("a picture")
    st = os.stat(image)
    old = sqlite3.connect(memo)  # its table, holding an entry for this very file version, but wrong
    old.execute("CREATE TABLE hashes (path TEXT, size INTEGER, mtime_ns INTEGER, inode INTEGER, sha256 TEXT, "
                "PRIMARY KEY (path, size, mtime_ns, inode))")
    old.execute("INSERT INTO hashes VALUES (?, ?, ?, ?, ?)", (str(image.resolve()), st.st_size, st.st_mtime_ns,
                                                             st.st_ino, "0" * 64))
    old.commit()
    old.close()
    assert filehash.file_sha256(image) == hashlib.sha256(b"a picture").hexdigest()
    filehash._MEMO.local.clear()
    reads = []
    real = filehash._hash_file
    monkeypatch.setattr(filehash, "_hash_file", lambda p: reads.append(p) or real(p))
    assert filehash.file_sha256(image) == hashlib.sha256(b"a picture").hexdigest() and reads == []  # remembered


def test_shard_content_and_what_does_not_count(base, write_graph):
    # the dataset's content changes every node of the shard
    assert changed(base, keys_of(["dataset.seed=1"])) == ALL
    # the graph's name, node names, batch sizes and replicas do not count
    renamed = write_graph(f"""
        extends: {ORACLE}
        name: another_name
        nodes:
          patches: {{batch_size: 3}}
          image: {{batch_size: 1}}
        """)
    assert keys_of(graph=renamed) == base
    text = ORACLE.read_text().replace("  oracle:", "  heat:").replace("oracle.heatmap", "heat.heatmap")
    other = write_graph(text, name="renamed_nodes.yaml")
    k = keys_of(graph=other)
    assert k["heat"] == base["oracle"] and {n: k[n] for n in base if n != "oracle"} == \
        {n: base[n] for n in base if n != "oracle"}
