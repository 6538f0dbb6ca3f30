# libFuzzer harnesses: our code linked with real nginx core code (nginx's
# own source of Debian's version, fetched from the package archive into
# build/fuzz), all built by clang with ASan and UBSan.
#
#   make fuzz                 each harness for FUZZ_SECONDS (default 60)
#   make fuzz-regress         every saved reproducer once

FUZZ_DIR     := $(BUILD)/fuzz
FUZZ_NGX     := $(FUZZ_DIR)/nginx-src
FUZZ_TARGETS := jwt claims amount reply sse visitor
FUZZ_BINS    := $(FUZZ_TARGETS:%=$(FUZZ_DIR)/fuzz_%)
FUZZ_SECONDS ?= 60
FUZZ_CFLAGS  := -g -O1 -fno-omit-frame-pointer -Wno-error \
                -fsanitize=fuzzer-no-link,address,undefined \
                -fno-sanitize-recover=undefined
FUZZ_INCS    := -I$(FUZZ_NGX)/objs -I$(FUZZ_NGX)/src/core \
                -I$(FUZZ_NGX)/src/event -I$(FUZZ_NGX)/src/event/modules \
                -I$(FUZZ_NGX)/src/os/unix -I$(FUZZ_NGX)/src/http \
                -I$(FUZZ_NGX)/src/http/modules -Ingx_credits_module

.PHONY: fuzz fuzz-build fuzz-regress

$(FUZZ_NGX)/configure: fuzz/get-nginx-source | deps
	fuzz/get-nginx-source $(FUZZ_NGX)
	@touch $@

# nginx with the module built in statically; its main() is renamed so that
# libFuzzer's own main() drives the harness
$(FUZZ_DIR)/nginx.a: $(FUZZ_NGX)/configure $(wildcard ngx_credits_module/*.[ch] ngx_credits_module/lua/*.lua) config config.make
	cd $(FUZZ_NGX) && ./configure --with-cc=clang \
	    --with-cc-opt="$(FUZZ_CFLAGS)" --with-ld-opt="-fsanitize=fuzzer-no-link,address,undefined" \
	    --without-http_rewrite_module --without-http_gzip_module \
	    --without-pcre --add-module=$(CURDIR) > ../configure.log 2>&1 \
	    || { tail -20 $(FUZZ_DIR)/configure.log; exit 1; }
	$(MAKE) -s -C $(FUZZ_NGX) -f objs/Makefile > $(FUZZ_DIR)/make.log 2>&1 \
	    || { tail -30 $(FUZZ_DIR)/make.log; exit 1; }
	objcopy --redefine-sym main=nginx_main $(FUZZ_NGX)/objs/src/core/nginx.o \
	    $(FUZZ_DIR)/nginx-main.o
	rm -f $@
	ar rcs $@ $(FUZZ_DIR)/nginx-main.o \
	    $$(find $(FUZZ_NGX)/objs -name '*.o' ! -name nginx.o)
	sed -n '/^objs\/nginx:/,/^$$/p' $(FUZZ_NGX)/objs/Makefile \
	    | grep -o -- '-l[a-z0-9_]*\|-Wl,[^ ]*' | sort -u | tr '\n' ' ' \
	    > $(FUZZ_DIR)/libs

$(FUZZ_DIR)/fuzz_%: fuzz/fuzz_%.c fuzz/fuzz_common.h $(FUZZ_DIR)/nginx.a
	clang $(FUZZ_CFLAGS) -fsanitize=fuzzer $(FUZZ_INCS) -o $@ $< \
	    -Wl,--whole-archive $(FUZZ_DIR)/nginx.a -Wl,--no-whole-archive \
	    $$(cat $(FUZZ_DIR)/libs) -lhiredis -ljwt -ljansson -lcrypto

fuzz-build: $(FUZZ_BINS)

fuzz: fuzz-build fuzz-regress
	@for t in $(FUZZ_TARGETS); do \
	    mkdir -p $(FUZZ_DIR)/corpus/$$t; \
	    echo "fuzz_$$t: $(FUZZ_SECONDS) s"; \
	    $(FUZZ_DIR)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) \
	        -print_final_stats=1 -artifact_prefix=$(FUZZ_DIR)/crash-$$t- \
	        $(FUZZ_DIR)/corpus/$$t fuzz/corpus/$$t 2>$(FUZZ_DIR)/fuzz_$$t.log \
	        || { tail -40 $(FUZZ_DIR)/fuzz_$$t.log; exit 1; }; \
	    grep -aE 'stat::number_of_executed_units|cov:' $(FUZZ_DIR)/fuzz_$$t.log \
	        | tail -2; \
	done

# every reproducer of a past finding, and every seed, run once
fuzz-regress: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	    for d in fuzz/corpus/$$t fuzz/regressions/$$t; do \
	        [ -d $$d ] && [ -n "$$(ls -A $$d)" ] || continue; \
	        $(FUZZ_DIR)/fuzz_$$t $$d/* > $(FUZZ_DIR)/regress_$$t.log 2>&1 \
	            || { tail -40 $(FUZZ_DIR)/regress_$$t.log; exit 1; }; \
	    done; \
	done; echo "fuzz regressions: all pass"
