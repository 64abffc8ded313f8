# Visual product search. Everything a target needs (virtualenv, packages, model weights,
# database schema) is set up by the target itself, once.
#
#   make demo                                   build, index and serve the Fashion-MNIST demo
#   make test                                   run the test suite
#   make index CATALOG=<folder> [METADATA=<csv or jsonl>] [ADD=1 | PRUNE=1] [REFIT=1]
#   make match PHOTOS=<folder> OUT=<csv> [K=5]     a folder of photos matched against the catalog, into a CSV
#   make duplicates [THRESHOLD=0.7] [CATEGORY_ONLY=1] [OUT=<csv>]  near-duplicate products, reviewed at /duplicates
#   make serve [PORT=8000] [SERVE_ONLY=1]       SERVE_ONLY=1: the service without TensorFlow (Installs below)
#   make bench [CATALOG=<folder> METADATA=<csv>]  speed and memory, written to bench/
#   make bench-scale [N=1000000]                  N synthetic products beside 10,000 at scale, to bench/
#   make soak [PRODUCTS=100000]                   searches during re-indexing, API writes and a compaction
#   make soak SERVERS=2 [DATABASE_URL=postgresql+psycopg://...]  the same on two servers over one database
#   make soak BACKUP=1 | SERVERS=2 OUTAGE=10         a backup during it, restored and compared; PostgreSQL down 10 s
#   make soak MODEL_CHANGE=fp32|finetune           make index with another model under it: the server switches
#   make eval CATALOG=<folder> [QUERIES=<csv>]     search quality, written to eval/
#   make finetune CATALOG=<folder> [METADATA=<csv>] [BLOCKS=3] [SEED=0]  adapt the model to the catalog; active if it measures better (then make index)
#   make backup TO=<new folder>                  a snapshot of the database, index, uploads and models, while serving
#   make restore FROM=<snapshot> DATA_DIR=<empty folder>  that snapshot, as the service it was (then make serve)
#   DATA_DIR=<folder> chooses where the database and index live (default data/)
#
# Installs (into .venv/, by whichever target needs them; docs/install.md gives their sizes):
#   requirements.txt         the default: the indexer (with TensorFlow) and the service
#   requirements-serve.txt   make serve SERVE_ONLY=1: the service alone, no TensorFlow, on a host whose
#                            models folder was prepared by `make weights` and `make index` elsewhere
#   requirements-ray.txt     added when RAY_ADDRESS is set (indexing on a Ray cluster; `local` starts one)
#   requirements-milvus.txt  added when VECTOR_STORE=milvus (Milvus, or Milvus Lite, as the vector store)
#   requirements-dev.txt     make test, lint and the benchmarks: everything above plus the test tools

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
SERVE_INSTALLED := $(VENV)/.installed-serve
RAY_INSTALLED := $(VENV)/.installed-ray
MILVUS_INSTALLED := $(VENV)/.installed-milvus
DEV_INSTALLED := $(VENV)/.installed-dev
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check
# The runtime packages this run needs: the service alone with SERVE_ONLY=1, else the default install; Ray and
# Milvus on top only when configured (RAY_ADDRESS, VECTOR_STORE=milvus).
RUNTIME := $(if $(SERVE_ONLY),$(SERVE_INSTALLED),$(INSTALLED)) $(if $(RAY_ADDRESS),$(RAY_INSTALLED)) \
  $(if $(filter milvus,$(VECTOR_STORE)),$(MILVUS_INSTALLED))
PORT ?= 8000
DEMO_CATALOG := demo-catalog

ifdef DATA_DIR
export DATA_DIR
endif
export PYTHONDONTWRITEBYTECODE := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: help venv dev weights migrate index serve demo demo-catalog test bench bench-scale soak eval finetune backup restore lint format clean

help:
	@sed -n '1,/^$$/p' Makefile | sed 's/^# \{0,1\}//'

# Each install leaves a stamp in .venv/, remade when its requirements file changes.
define new_venv
test -x $(PY) || $(PYTHON) -m venv $(VENV)
$(PIP_INSTALL) --upgrade pip
endef

# requirements.txt includes requirements-serve.txt, so the default install is the serve-only one too.
$(INSTALLED): requirements.txt requirements-serve.txt
	$(new_venv)
	$(PIP_INSTALL) -r requirements.txt
	touch $@ $(SERVE_INSTALLED)

$(SERVE_INSTALLED): requirements-serve.txt
	$(new_venv)
	$(PIP_INSTALL) -r requirements-serve.txt
	touch $@

# Ray and Milvus go on top of whichever runtime install this run has (| : without reinstalling when it changes).
$(RAY_INSTALLED): requirements-ray.txt | $(firstword $(RUNTIME))
	$(PIP_INSTALL) -r requirements-ray.txt
	touch $@

$(MILVUS_INSTALLED): requirements-milvus.txt | $(firstword $(RUNTIME))
	$(PIP_INSTALL) -r requirements-milvus.txt
	touch $@

venv: $(RUNTIME)

# Test, lint and benchmark tools (requirements-dev.txt), on top of the default install, Ray and Milvus: the
# tests exercise both, and `make bench` indexes on a local Ray cluster.
$(DEV_INSTALLED): $(INSTALLED) requirements-dev.txt requirements-ray.txt requirements-milvus.txt
	$(PIP_INSTALL) -r requirements-dev.txt
	touch $@ $(RAY_INSTALLED) $(MILVUS_INSTALLED)

dev: $(DEV_INSTALLED)

# With PRECISION=int8 the int8 model is calibrated on CATALOG's photos when given (make index passes it).
weights: venv
	@$(PY) -m indexer weights $(if $(CATALOG),--catalog "$(CATALOG)") $(if $(METADATA),--metadata "$(METADATA)")

migrate: venv
	@$(PY) -m indexer migrate

index: weights migrate
	@test -n "$(CATALOG)" || { echo "usage: make index CATALOG=<folder of product photos> [METADATA=<csv or jsonl>]"; exit 2; }
	$(PY) -m indexer index --catalog "$(CATALOG)" $(if $(METADATA),--metadata "$(METADATA)") \
	  $(if $(ADD),--add) $(if $(PRUNE),--prune) $(if $(REFIT),--refit)

.PHONY: match
match: venv
	@test -n "$(PHOTOS)" -a -n "$(OUT)" || { echo "usage: make match PHOTOS=<folder of photos> OUT=<matches.csv> [K=5]"; exit 2; }
	$(PY) -m indexer match --photos "$(PHOTOS)" --out "$(OUT)" $(if $(K),--k $(K))

serve: weights migrate
	$(PY) -m service --port $(PORT)

# Groups of products whose photos are near-identical, kept in the database for GET /duplicates (a weekly job).
.PHONY: duplicates
duplicates: migrate
	$(PY) -m indexer duplicates $(if $(THRESHOLD),--threshold $(THRESHOLD)) $(if $(CATEGORY_ONLY),--category-only) \
	  $(if $(OUT),--out "$(OUT)")

backup: venv
	@test -n "$(TO)" || { echo "usage: make backup TO=<new folder for the snapshot>"; exit 2; }
	$(PY) -m indexer backup --to "$(TO)"

restore: venv
	@test -n "$(FROM)" || { echo "usage: make restore FROM=<snapshot folder> DATA_DIR=<empty folder>"; exit 2; }
	$(PY) -m indexer restore --from "$(FROM)"

# $(call apt_install,<package>): a Debian package, through sudo unless root; fails without apt-get.
define apt_install
{ command -v apt-get >/dev/null && SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ) && \
  { $$SUDO apt-get install -y -q $(1) >/dev/null 2>&1 \
    || { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q $(1) >/dev/null; }; }; }
endef

# Debian's dataset-fashion-mnist package when apt is there; otherwise Keras downloads it.
demo-catalog: venv
	@if [ ! -f $(DEMO_CATALOG)/products.csv ]; then \
	  if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	    $(call apt_install,dataset-fashion-mnist) \
	      || echo "apt-get could not install dataset-fashion-mnist; falling back to Keras's download"; \
	  fi; \
	  $(PY) -m indexer demo-catalog $(DEMO_CATALOG); \
	fi

demo: demo-catalog weights migrate
	$(PY) -m indexer index --catalog $(DEMO_CATALOG)
	@echo
	@echo "Demo ready: open http://127.0.0.1:$(PORT)/ and upload a photo from $(DEMO_CATALOG)-queries/"
	@echo "  or: curl -F image=@$(DEMO_CATALOG)-queries/sneaker-1.png http://127.0.0.1:$(PORT)/api/search"
	@echo
	$(PY) -m service --port $(PORT)

# wrk is the benchmark's load generator; one test runs it against the real server. Debian's chromium is
# the browser that Playwright drives in tests/test_browser.py (Playwright's own browser download is not used).
# Debian's postgresql gives the server binaries (initdb, postgres) of the cluster that the tests start themselves
# in a temporary folder (tests/support/postgres.py; PG_BINDIR names another folder of them).
test: weights dev
	@command -v wrk >/dev/null || $(call apt_install,wrk) || echo "apt-get could not install wrk; its test will be skipped"
	@test -x /usr/bin/chromium || $(call apt_install,chromium) \
	  || echo "apt-get could not install chromium; the browser tests will be skipped"
	@test -n "$$PG_BINDIR" || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || $(call apt_install,postgresql) \
	  || echo "apt-get could not install postgresql; the PostgreSQL tests will be skipped"
	$(PY) -m pytest

# Throughput, latency and memory on a real catalog (default: the grocery-store dataset beside the repo).
# The HTTP load comes from wrk (Debian's package, installed here when missing).
bench: weights migrate dev
	@command -v wrk >/dev/null || $(call apt_install,wrk) || echo "apt-get could not install wrk"
	$(PY) -m bench $(if $(CATALOG),--catalog "$(CATALOG)") $(if $(METADATA),--metadata "$(METADATA)")

# A million products on one machine: N synthetic vectors around real photos' embeddings, imported with
# `indexer import-vectors` and measured beside a 10,000-product catalog, to bench/scale.json and scale.png.
N ?= 1000000
bench-scale: weights migrate dev
	$(PY) -m bench.scale --products $(N)

# Searches under concurrent re-indexing, API writes and a compaction, over PRODUCTS products (real photos
# plus synthetic vectors): 0 errors and 0 wrong results, to bench/soak.json.
# SERVERS=2: two servers over one PostgreSQL database (DATABASE_URL, else a throwaway cluster of Debian's
# postgresql, installed here when missing) and one DATA_DIR; 100 writes through one, each timed until the other
# shows it; searches on both; a compaction. 600 real products unless PRODUCTS says; to bench/soak-two-servers.json.
soak: weights migrate dev
ifeq ($(SERVERS),2)
	@test -n "$$DATABASE_URL" -o -n "$$PG_BINDIR" || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	  || $(call apt_install,postgresql) || echo "apt-get could not install postgresql"
endif
	$(PY) -m bench.soak --products $(or $(PRODUCTS),$(if $(filter 2,$(SERVERS)),0,$(if $(MODEL_CHANGE),0,100000))) \
	  $(if $(SERVERS),--servers $(SERVERS)) $(if $(CATALOG),--catalog "$(CATALOG)") \
	  $(if $(METADATA),--metadata "$(METADATA)") $(if $(OUTAGE),--outage $(OUTAGE) --clients 2) \
	  $(if $(BACKUP),--backup --writes 600) $(if $(MODEL_CHANGE),--model-change $(MODEL_CHANGE) --writes 400)

# Retrieval quality of DATA_DIR's index: QUERIES=<csv of image,category> or leave-one-out; writes eval/.
# WORDS=<column of QUERIES>: each photo also searched with q set to that column, beside the photo-only figures.
# COMPARE=1: every configuration (plain / fine-tuned, without / with whitening, with whitening and VIEWS=<extra
# catalog views>, flip,crop unless none) side by side, each indexed anew, with COARSE=<second label column> and
# query latency, to eval/configurations.json.
# RECOMMEND=1: the rules of POST /api/recommend, leave-one-out (TRIALS=<per category>), to eval/recommend/.
# DUPLICATES=1: 300 near-copies planted in a copy of CATALOG (indexed in WORK, default a temporary folder), the
# near-duplicate finder's precision and recall by threshold, to eval/duplicates/.
eval: weights migrate
	@test -n "$(CATALOG)" || { echo "usage: make eval CATALOG=<folder> [METADATA=<csv>] [QUERIES=<csv>] [LABEL=category] [WORDS=<column>] [COMPARE=1 [COARSE=coarse_category] [VIEWS=flip,crop]] [DUPLICATES=1 [WORK=<folder>]] [RECOMMEND=1 [TRIALS=n]]"; exit 2; }
ifdef COMPARE
	$(PY) -m eval.compare --catalog "$(CATALOG)" $(if $(METADATA),--metadata "$(METADATA)") \
	  --queries "$(QUERIES)" $(if $(COARSE),--coarse-label "$(COARSE)") $(if $(VIEWS),--views "$(VIEWS)")
else ifdef RECOMMEND
	$(PY) -m eval.recommend --catalog "$(CATALOG)" $(if $(TRIALS),--trials $(TRIALS))
else ifdef DUPLICATES
	$(PY) -m eval.duplicates --catalog "$(CATALOG)" $(if $(METADATA),--metadata "$(METADATA)") $(if $(WORK),--work "$(WORK)")
else
	$(PY) -m eval --catalog "$(CATALOG)" $(if $(METADATA),--metadata "$(METADATA)") \
	  $(if $(QUERIES),--queries "$(QUERIES)") $(if $(LABEL),--label "$(LABEL)") $(if $(WORDS),--words "$(WORDS)")
endif

# Transfer learning on the catalog's categories; the new model version becomes the active one only when the
# catalog's held-out photos measure it better than the plain network (the table is printed either way).
finetune: weights migrate
	@test -n "$(CATALOG)" || { echo "usage: make finetune CATALOG=<folder> [METADATA=<csv>] [BLOCKS=3] [SEED=0]"; exit 2; }
	$(PY) -m indexer finetune --catalog "$(CATALOG)" $(if $(METADATA),--metadata "$(METADATA)") \
	  $(if $(BLOCKS),--blocks $(BLOCKS)) $(if $(SEED),--seed $(SEED))

lint: dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf data $(DEMO_CATALOG) $(DEMO_CATALOG)-queries .pytest_cache .ruff_cache .hypothesis
