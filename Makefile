# ngx_http_credits_module: build, test and demo.
#
#   make            build the module (build/nginx/objs/ngx_http_credits_module.so)
#   make test       install what is missing, build, run the whole t/ suite
#   make demo       start a demo platform on 127.0.0.1 (make demo-stop ends it)
#   make deb        the Debian packages, in build/deb/ (lintian-checked)
#   make test-package   install them here, serve a charged request, purge

NGINX_SRC  ?= /usr/share/nginx/src
NGINX_BIN  ?= /usr/sbin/nginx
BUILD      := build
NGX_BUILD  ?= $(BUILD)/nginx
MODULE_SO  := $(NGX_BUILD)/objs/ngx_http_credits_module.so

# The distribution's own hardening flags, plus our warning policy.  nginx
# adds -W -Wall -Werror itself; -Wno-unused-parameter is nginx's own rule
# (handlers share signatures and rarely use every argument).
CC_OPT     := -g -O2 -fstack-protector-strong -Wformat -Werror=format-security \
              -fPIC -D_FORTIFY_SOURCE=2 -Wall -Wextra -Wno-unused-parameter \
              -Werror $(EXTRA_CC_OPT)
LD_OPT     := -Wl,-z,relro -Wl,-z,now -fPIC $(EXTRA_LD_OPT)

PROVE_ARGS ?= -r t/

# The sanitizer build: the same module with ASan and UBSan, loaded into the
# stock nginx with gcc's ASan runtime preloaded; reports go to files that
# must stay empty.
ASAN_BUILD := $(BUILD)/asan
ASAN_FLAGS := -O1 -fno-omit-frame-pointer -fsanitize=address,undefined \
              -fno-sanitize-recover=undefined
ASAN_LOGS  := $(CURDIR)/$(ASAN_BUILD)/reports

CREDITSCTL := $(BUILD)/creditsctl
DEB_DIR    := $(BUILD)/deb

.PHONY: deb test-package bench profile guard soak all deps module test test-asan module-asan demo demo-stop clean

all: module $(CREDITSCTL)

# debian/rules sets INSTALL_DEPS=true: a package build checks its
# Build-Depends instead of installing anything
INSTALL_DEPS ?= tools/install-deps

deps:
	@$(INSTALL_DEPS)

# nginx-dev ships headers and configure, not sources: configure runs in a
# directory of ours whose auto/, src/ and configure point into it, so the
# build never writes into system paths.
$(NGX_BUILD)/objs/Makefile: config config.make Makefile | deps
	@echo "configuring the module build against $(NGINX_SRC)"
	@rm -rf $(NGX_BUILD)
	@mkdir -p $(NGX_BUILD)
	@ln -s $(NGINX_SRC)/auto $(NGINX_SRC)/src $(NGINX_SRC)/configure $(NGX_BUILD)/
	@cd $(NGX_BUILD) && bash -c '. $(NGINX_SRC)/conf_flags && \
	    ./configure "$${NGX_CONF_FLAGS[@]}" --with-compat \
	    --with-cc-opt="$(CC_OPT)" --with-ld-opt="$(LD_OPT)" \
	    --add-dynamic-module=$(CURDIR)' > configure.log 2>&1 \
	    || { tail -20 $(NGX_BUILD)/configure.log; exit 1; }

module: $(NGX_BUILD)/objs/Makefile
	@$(MAKE) -s -C $(NGX_BUILD) -f objs/Makefile modules

CREDITSCTL_SRC := creditsctl/creditsctl.c creditsctl/redis.c \
                  creditsctl/transport.c creditsctl/books.c \
                  creditsctl/archive.c creditsctl/json.c creditsctl/limits.c

$(CREDITSCTL): $(CREDITSCTL_SRC) creditsctl/creditsctl.h | deps
	@mkdir -p $(BUILD)
	$(CC) -std=c99 -D_DEFAULT_SOURCE -O2 -g -Wall -Wextra -Werror \
	    $(EXTRA_CC_OPT) -o $@ $(CREDITSCTL_SRC) -lhiredis -lssl -lcrypto \
	    $(EXTRA_LD_OPT)

test: module $(CREDITSCTL)
	CREDITS_MODULE=$(CURDIR)/$(MODULE_SO) NGINX_BIN=$(NGINX_BIN) \
	CREDITSCTL=$(CURDIR)/$(CREDITSCTL) \
	    prove $(PROVE_ARGS)

module-asan:
	@$(MAKE) -s NGX_BUILD=$(ASAN_BUILD) EXTRA_CC_OPT="$(ASAN_FLAGS)" \
	    EXTRA_LD_OPT="-fsanitize=address,undefined" module

test-asan: module-asan $(CREDITSCTL)
	@rm -rf $(ASAN_LOGS) && mkdir -p $(ASAN_LOGS) && chmod 1777 $(ASAN_LOGS)
	CREDITS_MODULE=$(CURDIR)/$(ASAN_BUILD)/objs/ngx_http_credits_module.so \
	NGINX_BIN=$(NGINX_BIN) CREDITSCTL=$(CURDIR)/$(CREDITSCTL) \
	CREDITS_NGINX_PRELOAD=$$(gcc -print-file-name=libasan.so) \
	ASAN_OPTIONS=detect_leaks=0:log_path=$(ASAN_LOGS)/asan \
	UBSAN_OPTIONS=print_stacktrace=1:log_path=$(ASAN_LOGS)/ubsan \
	    prove $(PROVE_ARGS)
	@if [ -n "$$(ls -A $(ASAN_LOGS))" ]; then \
	    cat $(ASAN_LOGS)/*; echo "sanitizer reports: see above"; exit 1; \
	fi; echo "sanitizers: no reports"

include fuzz/fuzz.mk

# the module against plain proxy_pass: tables into docs/performance.md
bench: module
	CREDITS_MODULE=$(CURDIR)/$(MODULE_SO) NGINX_BIN=$(NGINX_BIN) bench/run

# where a request's instructions go, by callgrind
profile: module
	CREDITS_MODULE=$(CURDIR)/$(MODULE_SO) NGINX_BIN=$(NGINX_BIN) bench/profile

# fails when the module adds 10 % more instructions per request than a
# figure of bench/guard.figure: HS256, limits, SSE (callgrind, a few
# seconds each; run by .ci/run)
guard: module
	CREDITS_MODULE=$(CURDIR)/$(MODULE_SO) NGINX_BIN=$(NGINX_BIN) bench/guard

# five minutes of mixed traffic, then every audit and the workers' memory
soak: module $(CREDITSCTL)
	CREDITS_MODULE=$(CURDIR)/$(MODULE_SO) NGINX_BIN=$(NGINX_BIN) \
	CREDITSCTL=$(CURDIR)/$(CREDITSCTL) tools/soak

# debian/rules builds with this Makefile: see tools/build-deb
deb: | deps
	@tools/build-deb $(DEB_DIR)

# installs the packages on this machine (as root), then purges them
test-package: deb
	CREDITS_TEST_PACKAGE=$(CURDIR)/$(DEB_DIR) prove -v t/package.t

demo: module
	@tools/demo start

demo-stop:
	@tools/demo stop

clean:
	rm -rf $(BUILD)
