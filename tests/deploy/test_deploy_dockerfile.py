"""Static checks of the Dockerfile and .dockerignore (Docker cannot run here): bases, pins, users, dependencies,
the layer order that keeps dependencies cached across code edits, and what the build context holds."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest
from deploy_support import DOCKERFILE, REPO, Stage, dockerignore_excludes, dockerignore_patterns, parse_dockerfile

# onnxruntime-gpu minor release -> (CUDA major, cuDNN major) it is built against, read from the wheel itself:
# `pip download --no-deps onnxruntime-gpu==1.31.1`: onnxruntime/capi/build_and_package_info.py has
# cuda_version = '13.0'; METADATA's `cudnn` extra requires nvidia-cudnn-cu13~=9.0; the CUDA provider library
# links libcudart.so.13 / libcublas.so.13. Bumping the pin means re-reading the new wheel and adding its row.
ORT_GPU_CUDA_CUDNN = {"1.31": (13, 9)}
CUDA_TAG = re.compile(r"^nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn(\d*)-runtime-ubuntu\d\d\.\d\d$")
RUNTIME_STAGES = ("cpu", "gpu")


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {s.name: s for s in parse_dockerfile(DOCKERFILE.read_text())}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _extra(name: str) -> list[str]:
    return _pyproject()["project"]["optional-dependencies"][name]


def _ort_gpu_minor() -> str:
    (spec,) = [d for d in _extra("gpu") if d.startswith("onnxruntime-gpu")]
    m = re.search(r"(?:~=|==)\s*(\d+)\.(\d+)", spec)
    assert m, f"onnxruntime-gpu must be pinned with ~= or ==, got {spec!r}"
    return f"{m.group(1)}.{m.group(2)}"


def test_stages_are_wheel_cpu_gpu_with_gpu_the_default(stages):
    assert list(stages) == ["wheel", "cpu", "gpu"], "the last stage is what `docker build .` produces: gpu"


def test_gpu_base_carries_the_cuda_and_cudnn_majors_of_the_pinned_onnxruntime_gpu(stages):
    minor = _ort_gpu_minor()
    assert minor in ORT_GPU_CUDA_CUDNN, (
        f"onnxruntime-gpu {minor}.x is pinned in pyproject.toml but its CUDA/cuDNN majors are not recorded here: "
        "read them from the wheel and add a row to ORT_GPU_CUDA_CUDNN"
    )
    cuda_major, cudnn_major = ORT_GPU_CUDA_CUDNN[minor]
    m = CUDA_TAG.match(stages["gpu"].base)
    assert m, f"gpu stage must start from an nvidia/cuda X.Y.Z-cudnn-runtime image, got {stages['gpu'].base}"
    assert int(m.group(1)) == cuda_major, f"onnxruntime-gpu {minor} needs CUDA {cuda_major}.x, base has {m.group(0)}"
    # NVIDIA tags CUDA >= 12.4 images with plain "cudnn" (cuDNN 9); an explicit digit must be the right major
    if m.group(4):
        assert int(m.group(4)) == cudnn_major
    else:
        assert cuda_major >= 13 or (cuda_major == 12 and int(m.group(2)) >= 4), "plain 'cudnn' tag means cuDNN 9 only"
        assert cudnn_major == 9


def test_every_base_image_is_pinned_to_an_exact_version(stages):
    for stage in stages.values():
        _, _, tag = stage.base.partition(":")
        assert tag and tag != "latest", f"stage {stage.name}: base {stage.base} is not pinned"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"stage {stage.name}: tag {tag} is not an exact x.y.z version"


def test_each_runtime_stage_installs_its_own_lock_with_one_onnxruntime_and_no_torch(stages):
    expected = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}
    for name, stage in stages.items():
        runs = " ".join(stage.args("RUN"))
        assert "torch" not in runs, f"stage {name} mentions torch"
        if name == "wheel":
            assert "--no-deps" in runs, "the wheel stage builds the package only, without installing dependencies"
            continue
        copies = " ".join(stage.args("COPY"))
        assert f"deploy/requirements/{name}.txt" in copies, f"stage {name} must install deploy/requirements/{name}.txt"
        other = "gpu" if name == "cpu" else "cpu"
        assert f"deploy/requirements/{other}.txt" not in copies
        assert "[serve" not in runs, f"stage {name} resolves extras at build time instead of installing its lock"
        assert f"check_image_env.py {expected[name]}" in runs, f"stage {name} must verify its environment at build time"
        assert "pip check" in runs, f"stage {name} must check that the lock satisfies the wheel's requirements"


def _pip_installs(stage: Stage) -> list[tuple[int, str]]:
    """(instruction index, the `pip install ...` command) of every pip install in the stage."""
    out = []
    for i, (keyword, args) in enumerate(stage.instructions):
        if keyword == "RUN":
            out += [(i, c.strip()) for c in args.split("&&") if re.search(r"\bpip install\b", c)]
    return out


@pytest.mark.parametrize("name", RUNTIME_STAGES, ids=lambda name: f"{name}-stage")  # a bare "gpu" id means a GPU test
def test_dependencies_install_in_their_own_layer_before_anything_of_the_app(stages, name):
    """The layer cache keeps the dependencies when code or README change: the first pip install takes only the
    stage's lock (hash-checked, no resolution), and every COPY before it copies only that lock; the app comes
    after, as the wheel alone without dependencies."""
    stage = stages[name]
    installs = _pip_installs(stage)
    assert len(installs) == 2, f"stage {name}: expected the dependency install, then the app install: {installs}"
    (deps_at, deps), (app_at, app) = installs
    assert "--require-hashes" in deps and "--no-deps" in deps and "-r /tmp/requirements.txt" in deps, deps
    assert "--only-binary=:all:" in deps, "wheels only: an sdist build would run unhashed build dependencies"
    before = [args for keyword, args in stage.instructions[:deps_at] if keyword in ("COPY", "ADD")]
    assert before == [f"deploy/requirements/{name}.txt /tmp/requirements.txt"], before
    assert deps_at < app_at
    assert re.fullmatch(r"\S+/pip install --no-deps /tmp/wheels/mixinfer-\*\.whl", app), app
    wheel_copy = next(i for i, (k, a) in enumerate(stage.instructions) if k == "COPY" and "--from=wheel" in a)
    assert deps_at < wheel_copy < app_at


def test_only_the_wheel_stage_copies_the_source_and_readme(stages):
    for name, stage in stages.items():
        sources = " ".join(stage.args("COPY"))
        if name == "wheel":
            assert "service" in sources and "README.md" in sources
        else:
            assert not re.search(r"(^|\s)(service|README\.md|pyproject\.toml)(\s|$)", sources), (name, sources)


def test_serving_extras_hold_no_torch_and_exactly_one_onnxruntime_each():
    serve = _extra("serve")
    for name in ("cpu", "gpu"):
        deps = serve + _extra(name)
        names = [re.split(r"[\s\[~=<>!]", d, maxsplit=1)[0].lower() for d in deps]
        assert not any(n.startswith("torch") for n in names), f".[serve,{name}] pulls torch: {names}"
        assert sum(n in ("onnxruntime", "onnxruntime-gpu") for n in names) == 1, names


def test_runtime_stages_run_as_a_non_root_user_with_healthcheck_and_entrypoint(stages):
    for name in RUNTIME_STAGES:
        stage = stages[name]
        users = stage.args("USER")
        assert users, f"stage {name} has no USER"
        assert users[-1] not in ("root", "0", "0:0"), f"stage {name} runs as {users[-1]}"
        keywords = [k for k, _ in stage.instructions]
        assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN"), "USER after installs"
        assert "useradd" in " ".join(stage.args("RUN"))
        (health,) = stage.args("HEALTHCHECK")
        assert "/opt/mixinfer/healthcheck.py" in health and "--start-period" in health
        assert stage.args("EXPOSE") == ["8000 8001 8002"]  # REST, OIP v2 gRPC, metrics
        assert stage.args("ENTRYPOINT") == ['["mixinfer"]'] and stage.args("CMD") == ['["serve"]']
        env = " ".join(stage.args("ENV"))
        for var in (
            "MIXINFER_HOST=0.0.0.0",
            "MIXINFER_PORT=8000",
            "MIXINFER_GRPC_PORT=8001",
            "MIXINFER_METRICS_PORT=8002",
            "MIXINFER_MODEL_DIR=/models",
        ):
            assert var in env, f"stage {name} lacks {var}"
    assert "CUDAExecutionProvider" in " ".join(stages["gpu"].args("ENV"))
    assert "MIXINFER_PROVIDERS=CPUExecutionProvider" in " ".join(stages["cpu"].args("ENV"))


def _tracked(path: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", path], cwd=REPO, capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.split()


def test_every_copied_path_exists_and_is_in_the_build_context(stages):
    patterns = dockerignore_patterns()
    for stage in stages.values():
        for copy in stage.args("COPY"):
            parts = [p for p in copy.split() if not p.startswith("--")]
            if "--from=" in copy:
                continue
            for src in parts[:-1]:
                assert (REPO / src).exists(), f"COPY source {src} does not exist"
                files = _tracked(src) if (REPO / src).is_dir() else [src]
                assert files, f"COPY source {src} holds no tracked file"
                for f in files:
                    assert not dockerignore_excludes(f, patterns), f"COPY source {f} is excluded by .dockerignore"


def test_the_build_context_takes_exactly_the_tracked_files_of_model_store():
    """A bundle built locally and never committed stays out of the images; `make dockerignore` re-lists the tracked
    ones after a bundle is committed."""
    patterns = dockerignore_patterns()
    kept = sorted(p[1:] for p in patterns if p.startswith("!model_store"))
    assert kept == sorted(_tracked("model_store")), "run `make dockerignore`"
    for untracked in ("model_store/mnist-mixup/99/model.onnx", "model_store/new-model/1/manifest.json"):
        assert dockerignore_excludes(untracked, patterns), untracked
    for lock in ("deploy/requirements/cpu.txt", "deploy/requirements/gpu.txt"):
        assert not dockerignore_excludes(lock, patterns), lock


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        ("runs/mnist/epoch1.safetensors", True),
        ("data/mnist5k.npz", True),
        (".venv/bin/python", True),
        (".venv-serve/bin/python", True),
        (".git/HEAD", True),
        (".pytest_cache/v", True),
        ("service/__pycache__/cli.cpython-311.pyc", True),
        ("tests/conftest.py", True),
        (".env", True),
        ("pyproject.toml", False),
        ("README.md", False),
        ("service/cli.py", False),
        ("model_store/mnist-mixup/1/model.onnx", False),
        ("model_store/mnist-mixup/2/manifest.json", False),
        ("deploy/healthcheck.py", False),
    ],
)
def test_dockerignore_keeps_runs_data_and_caches_out(path, excluded):
    assert dockerignore_excludes(path, dockerignore_patterns()) is excluded


def test_image_environment_check_refuses_this_dev_venv_which_has_torch():
    """The guard the images run at build time really detects torch (this .venv has it, on purpose)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "check_image_env.py"), "onnxruntime"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "torch is installed" in proc.stderr
