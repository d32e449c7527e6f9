"""transformers' own model tests as a referee for apply_regap: each covered family's test file is run twice,
plain and with every model patched at construction (``regap_patch_plugin.py``), and the tests that pass
plain but fail patched are listed.

    python tests/referee/run_transformers_suite.py                      # all 16 families
    python tests/referee/run_transformers_suite.py --family llava -k training

Sources (fetched once, then read from the cache; no network when cached):
- the transformers sdist of the installed version (``pip download``): the common test mixins
  (tests/test_modeling_common.py, ...) that match the installed library;
- the per-family test files, tests/generation/ and tests/utils/test_configuration_utils.py, which the
  sdist lacks, from a git repository of transformers (``--git``: a URL, cloned sparsely, or a local
  clone / mirror) at ``--ref`` (default ``v<installed version>``). Drift between that ref and the
  installed version is absorbed by the comparison: only a test that passes plain counts.
The cache is ``$REGAP_REFEREE_CACHE`` or ``~/.cache/regap_fast/transformers-tests/<version>`` (outside the
repository); ``--refresh`` rebuilds it. Each run's junit files go to ``<cache>/runs/<plain|patched>/``.

The run is slow (see docs/development.md); it is not part of the default ``pytest`` run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXCUSED = "regap: loss value"  # the plugin's xfail reason for a loss-value assertion it names
DEFAULT_GIT = "https://github.com/huggingface/transformers"
# what the per-family files need beside the sdist's mixins (the sdist's own files win where both have one)
FROM_GIT = ["tests/__init__.py", "tests/models/__init__.py", "tests/causal_lm_tester.py", "tests/exporters",
            "tests/generation/__init__.py", "tests/generation/test_utils.py", "tests/utils/__init__.py",
            "tests/utils/test_configuration_utils.py", "tests/utils/tiny_model_summary.json", "utils/test_module",
            "utils/fetch_hub_objects_for_ci.py"]
MARKERS = ["generate", "all_flash_attn_test", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
           "bitsandbytes", "is_training_test", "is_tensor_parallel_test", "is_expert_parallel_test", "is_fsdp_test"]
# names the git ref's test files import that the installed transformers no longer has (git ref drift)
DRIFT_CONFTEST = '''"""Written by regap_fast's run_transformers_suite.py: names the git ref's test files import that the
installed transformers no longer has."""
import transformers
import transformers.testing_utils as testing_utils
import transformers.utils

if not hasattr(testing_utils, "require_read_token"):  # gated checkpoints: only @slow tests use it, skipped here
    testing_utils.require_read_token = lambda test: test
if not hasattr(transformers.utils, "is_ipex_available"):  # IPEX support was dropped
    transformers.utils.is_ipex_available = lambda: False
if not hasattr(transformers.PreTrainedModel, "_is_stateful"):  # generation tests skip stateful (RNN) models by it
    transformers.PreTrainedModel._is_stateful = False
'''
EXPORT_STUB = '''"""Written by regap_fast's run_transformers_suite.py: the git ref has no tests/exporters/test_export.py
(it predates it), so the export tests of test_modeling_common's ModelTesterMixin are not run."""


class ExportTesterMixin:
    pass
'''


def families() -> dict[str, str]:
    """module folder under transformers/models -> the covered class, from tests/integrations/vlm_families.py."""
    import transformers

    sys.path.insert(0, str(HERE))
    from regap_patch_plugin import covered_classes

    out = {}
    for name in covered_classes():
        module = getattr(transformers, name).__module__  # transformers.models.<folder>.modeling_<folder>
        out[module.split(".")[2]] = name
    return out


def default_cache(version: str) -> Path:
    env = os.environ.get("REGAP_REFEREE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "regap_fast" / "transformers-tests" / version


def run(cmd, **kwargs):
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, **kwargs)


def sdist_tests(version: str, cache: Path) -> Path:
    """The sdist's tests/ folder (common mixins), downloaded once."""
    out = cache / "sdist"
    if (out / "tests" / "test_modeling_common.py").exists():
        return out / "tests"
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"transformers=={version}", "-d", tmp])
        (archive,) = Path(tmp).glob("transformers-*.tar.gz")
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            for m in members:
                m.name = m.name[len(f"transformers-{version}/"):]
            tar.extractall(out, members=members, filter="data")
    return out / "tests"


def git_files(source: str, ref: str, paths: list[str], dest: Path) -> None:
    """``paths`` of ``source`` at ``ref`` into ``dest``: git archive from a local clone, else a sparse
    shallow clone (the whole repository is over a gigabyte)."""
    if Path(source).exists():
        git_dir = ["--git-dir", source] if (Path(source) / "HEAD").exists() else ["-C", source]
        listed = subprocess.run(["git", *git_dir, "ls-tree", "--name-only", ref, *paths], check=True,
                                capture_output=True, text=True).stdout.split()
        with tempfile.NamedTemporaryFile(suffix=".tar") as tar_file:
            run(["git", *git_dir, "archive", "--format=tar", "-o", tar_file.name, ref, *listed])
            with tarfile.open(tar_file.name) as tar:
                tar.extractall(dest, filter="data")
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(["git", "clone", "--depth", "1", "--branch", ref, "--filter=blob:none", "--sparse", source, tmp])
        run(["git", "-C", tmp, "sparse-checkout", "set", "--no-cone", *("/" + p for p in paths)])
        for p in paths:
            src = Path(tmp) / p
            if src.is_dir():
                shutil.copytree(src, dest / p, dirs_exist_ok=True)
            elif src.exists():
                (dest / p).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / p)


def build_tree(version: str, cache: Path, source: str, ref: str, folders: list[str]) -> Path:
    """``<cache>/tree``: the git ref's per-family files with the sdist's common mixins on top."""
    import transformers

    tree = cache / "tree"
    stamp = tree / "SOURCES.txt"
    wanted = f"sdist transformers=={version}\ngit {source} @ {ref}\n"
    have = [f for f in folders if (tree / "tests" / "models" / f).exists()]
    if stamp.exists() and stamp.read_text() == wanted and have == folders:
        return tree
    mixins = sdist_tests(version, cache)
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    git_files(source, ref, FROM_GIT + [f"tests/models/{f}" for f in folders], tree)
    shutil.copytree(mixins, tree / "tests", dirs_exist_ok=True)
    export = tree / "tests" / "exporters" / "test_export.py"
    if not export.exists():
        export.parent.mkdir(parents=True, exist_ok=True)
        (export.parent / "__init__.py").touch()
        export.write_text(EXPORT_STUB)
    (tree / "conftest.py").write_text(DRIFT_CONFTEST)
    (tree / "src").mkdir()  # test_pipeline_mixin reads src/transformers of a checkout: the installed one
    (tree / "src" / "transformers").symlink_to(Path(transformers.__file__).parent, target_is_directory=True)
    (tree / "pytest.ini").write_text("[pytest]\nmarkers =\n" + "".join(f"    {m}\n" for m in MARKERS))
    stamp.write_text(wanted)
    return tree


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test id -> (passed | failed | skipped, first line of the failure message)."""
    result = {}
    if not junit.exists():
        return result
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        state, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                state = "skipped" if tag == "skipped" else "failed"
                message = (node.get("message") or node.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else ""
                break
        result[name] = (state, message)
    return result


def run_file(tree: Path, folder: str, patched: bool, out: Path, args) -> tuple[Path, float, str]:
    junit = out / ("patched" if patched else "plain") / f"{folder}.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", f"tests/models/{folder}/test_modeling_{folder}.py", "-q",
           "-p", "no:cacheprovider", "-p", "no:randomly", "--junitxml", str(junit), "-o", "junit_family=xunit1",
           "--timeout", str(args.timeout)]
    if args.k:
        cmd += ["-k", args.k]
    if patched:
        cmd += ["-p", "regap_patch_plugin", "--regap-weight", str(args.regap_weight)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    start = time.time()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines() or [f"pytest exited {proc.returncode}: {proc.stderr.strip()[-300:]}"]
    plugin = [line for line in lines if line.startswith("regap_patch_plugin:")]
    if patched and not plugin:
        raise SystemExit(f"{folder}: the patched run did not load regap_patch_plugin:\n{proc.stderr[-2000:]}")
    return junit, time.time() - start, " | ".join(plugin + lines[-1:])


def main(argv=None) -> int:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", help="a transformers/models folder (default: all covered)")
    parser.add_argument("-k", help="pytest -k expression for every file")
    parser.add_argument("--git", default=DEFAULT_GIT, help="transformers git repository: URL or local clone")
    parser.add_argument("--ref", default=f"v{transformers.__version__}", help="git ref of the per-family files")
    parser.add_argument("--cache", type=Path, default=default_cache(transformers.__version__))
    parser.add_argument("--refresh", action="store_true", help="rebuild the cached test tree")
    parser.add_argument("--regap-weight", type=float, default=0.1)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per test (pytest-timeout)")
    parser.add_argument("--only", choices=["plain", "patched", "neither"],
                        help="run one side (the other's junit is reused), or none (compare the junit files only)")
    parser.add_argument("--out", type=Path, help="junit folder (default <cache>/runs)")
    parser.add_argument("--reuse", type=Path, help="with --only: the junit folder of the sides not run (default --out)")
    args = parser.parse_args(argv)
    importlib.import_module("pytest_timeout")  # a hung test would hang the run: fail early instead
    importlib.import_module("parameterized")  # transformers' tests import it

    covered = families()
    folders = args.family or list(covered)
    unknown = sorted(set(folders) - set(covered))
    if unknown:
        parser.error(f"not a covered family: {unknown}; choose from {sorted(covered)}")
    if args.refresh:
        shutil.rmtree(args.cache / "tree", ignore_errors=True)
    tree = build_tree(transformers.__version__, args.cache, args.git, args.ref, sorted(covered))
    out = args.out or args.cache / "runs"
    print(f"test tree: {tree} ({(tree / 'SOURCES.txt').read_text().strip()})", flush=True)

    start, regressions, excused, total = time.time(), {}, {}, 0
    for folder in folders:
        sides = {}
        for patched in (False, True):
            if args.only and args.only != ("patched" if patched else "plain"):
                junit = (args.reuse or out) / ("patched" if patched else "plain") / f"{folder}.xml"
                sides[patched] = outcomes(junit)
                continue
            junit, seconds, tail = run_file(tree, folder, patched, out, args)
            sides[patched] = outcomes(junit)
            print(f"{folder:16s} {'patched' if patched else 'plain  '} {seconds:6.0f}s  {tail}", flush=True)
        plain, patched = sides[False], sides[True]
        total += len(plain)
        passed = [t for t, (state, _) in plain.items() if state == "passed"]
        lost = {t: patched[t][1] for t in passed if t in patched and patched[t][0] == "failed"}
        lost.update({t: "missing from the patched run (collection or crash)" for t in passed if t not in patched})
        regressions[folder] = lost
        excused[folder] = [t for t in passed if t in patched and patched[t][1].startswith(EXCUSED)]

    print(f"\n== pass plain, fail patched ({sum(map(len, regressions.values()))} of {total} tests, "
          f"{len(folders)} families, {time.time() - start:.0f}s)")
    for folder, lost in regressions.items():
        for test, message in sorted(lost.items()):
            print(f"{folder:16s} {test}\n{'':16s}   {message}")
    print(f"\n== excused by regap_patch_plugin.LOSS_VALUE_ASSERTIONS ({sum(map(len, excused.values()))})")
    for folder, tests in excused.items():
        for test in tests:
            print(f"{folder:16s} {test}")
    return 1 if any(regressions.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
