# Two commands on a fresh machine:
#   make demo   - set up .venv and train a Para-Former on digits on the embedded default (local Ray)
#   make test   - set up .venv and run the whole test suite
# A GPU user installs the CUDA build first:  make setup TORCH_SPEC="torch==2.13.0 --index-url <CUDA wheel index>"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (a CUDA build is several GB); see README "GPU".
TORCH_SPEC ?= torch==2.13.0
# Test files run on this many pytest-xdist workers, each with its own local Ray (2: this machine's cores;
# 3 was no faster here and started a 3-node test cluster too slowly: docs/TESTING.md).
TEST_JOBS ?= 2
# Ray binds to loopback only, in every process; CLI clients send the auth token.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := token
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test lint bench bench-peers-env clean datasets cluster-tools

# The venv remembers which TORCH_SPEC its torch came from (.torch-spec): a different one (a CUDA build
# after `make demo`) reinstalls torch and then the package, instead of silently keeping the old torch.
TORCH_STAMP := $(VENV)/.torch-spec
ifneq ($(shell cat $(TORCH_STAMP) 2>/dev/null),$(strip $(TORCH_SPEC)))
.PHONY: $(TORCH_STAMP)
endif

$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip uninstall -q -y torch >/dev/null 2>&1 || true  # a +cpu build satisfies torch==X too
	$(PY) -m pip install -q $(TORCH_SPEC)
	echo '$(strip $(TORCH_SPEC))' > $@

$(VENV)/.installed: pyproject.toml $(TORCH_STAMP)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed datasets cluster-tools

# Fashion-MNIST ships as a Debian package; install it where apt is available (best effort, root only).
datasets:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"; \
	fi

# openssh-server and rsync for tests/cluster/test_ray_submit.py (`ray up` over ssh to this machine):
# installed where apt is available and we are root, like the datasets above. The test then runs its
# own sshd per connection (inetd mode, a key and config of its own): no daemon is left running.
CLUSTER_PACKAGES := openssh-server openssh-client rsync
cluster-tools:
	@if { [ ! -x /usr/sbin/sshd ] || ! command -v rsync >/dev/null 2>&1 || ! command -v ssh >/dev/null 2>&1; } && \
	   command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		(apt-get install -y -q $(CLUSTER_PACKAGES) >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(CLUSTER_PACKAGES) >/dev/null 2>&1)) || \
		echo "note: could not install $(CLUSTER_PACKAGES); tests/cluster/test_ray_submit.py will fail"; \
	fi
	@if [ -x /usr/sbin/sshd ] && [ "$$(id -u)" = 0 ]; then mkdir -p /run/sshd; fi  # sshd's privilege-separation dir

demo: setup
	$(PY) launch/train.py --config digits

test: setup
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=25 tests

# The peer benchmark's Triton (launch/bench_serve.py --peers): nvidia-pytriton 0.7.0 pins numpy<2 and,
# through tritonclient[grpc,http], protobuf<7, which the project cannot run on; so it lives in a venv
# of its own, which sees the project's venv (torch, layerpar) behind its own packages through a .pth.
PEERS_VENV ?= .venv-peers
bench-peers-env: $(VENV)/.installed
	$(PY) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q nvidia-pytriton==0.7.0
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > \
		"$$($(PEERS_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/layerpar-project.pth"
	$(PEERS_VENV)/bin/python -c 'import pytriton, torch, layerpar.model; print("pytriton ready in $(PEERS_VENV)")'

lint: setup
	$(PY) -m ruff check layerpar launch tests

clean:
	rm -rf $(VENV) runs .pytest_cache
