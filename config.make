# Appended to nginx's objs/Makefile: the Lua scripts become a C header at
# build time, so editing a script rebuilds the module without reconfiguring.
# Every script starts with expire.lua, their shared lazy expiry.

CREDITS_LUA="$CREDITS_SRC/lua/expire.lua $CREDITS_SRC/lua/hold.lua \
             $CREDITS_SRC/lua/settle.lua $CREDITS_SRC/lua/move.lua"

cat << END                                            >> $NGX_MAKEFILE

$CREDITS_GEN/ngx_http_credits_lua.h:	$CREDITS_LUA $ngx_addon_dir/tools/lua2c
	mkdir -p $CREDITS_GEN
	sh $ngx_addon_dir/tools/lua2c $CREDITS_SRC/lua/expire.lua \
	    hold=$CREDITS_SRC/lua/hold.lua settle=$CREDITS_SRC/lua/settle.lua \
	    move=$CREDITS_SRC/lua/move.lua > \$@.tmp
	mv \$@.tmp \$@

END
