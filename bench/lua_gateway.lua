-- The hand-built alternative the module is measured against: Lua in nginx
-- (Debian's lua-nginx-module, OpenResty style) doing the same work per
-- request: the HS256 token check, a hold before proxying and a settle
-- after, with the module's own Redis scripts, over cosockets with a
-- keepalive pool.  Written the way such a gateway usually is: one Redis
-- round trip per hold, the settle from a zero-delay timer (the log phase
-- cannot use sockets).  Only for make bench.

local ffi = require "ffi"

ffi.cdef [[
typedef struct evp_md_st EVP_MD;
const EVP_MD *EVP_sha256(void);
unsigned char *HMAC(const EVP_MD *evp_md, const void *key, int key_len,
                    const unsigned char *d, size_t n, unsigned char *md,
                    unsigned int *md_len);
]]

local _M = {}

local conf
local digest = ffi.new("unsigned char[32]")
local digest_len = ffi.new("unsigned int[1]")


local function hex(s)
    return (s:gsub('.', function(c) return string.format('%02x', c:byte()) end))
end

local function slurp(path)
    local f = assert(io.open(path))
    local s = f:read('*a')
    f:close()
    return s
end

-- conf: secret, redis_host, redis_port, lua_dir (the module's scripts),
-- price, route, ttl
function _M.init(c)
    conf = c
    local head = slurp(c.lua_dir .. '/expire.lua')
    conf.hold = head .. slurp(c.lua_dir .. '/hold.lua')
    conf.settle = head .. slurp(c.lua_dir .. '/settle.lua')
    conf.hold_sha = hex(ngx.sha1_bin(conf.hold))
    conf.settle_sha = hex(ngx.sha1_bin(conf.settle))
end


local function b64url(s)
    s = s:gsub('-', '+'):gsub('_', '/')
    local pad = #s % 4
    if pad > 0 then
        s = s .. string.rep('=', 4 - pad)
    end
    return ngx.decode_base64(s)
end

local function hs256(data)
    ffi.C.HMAC(ffi.C.EVP_sha256(), conf.secret, #conf.secret, data, #data,
               digest, digest_len)
    return ffi.string(digest, digest_len[0])
end

-- the project of a valid token, or nil
local function project()
    local auth = ngx.var.http_authorization
    local token = auth and auth:match('^Bearer%s+(.+)$')
    local h, p, s = (token or ''):match('^([^.]+)%.([^.]+)%.([^.]+)$')
    if not h then
        return nil
    end
    local header = b64url(h)
    if not header or not header:find('"alg"%s*:%s*"HS256"') then
        return nil
    end
    if b64url(s) ~= hs256(h .. '.' .. p) then
        return nil
    end
    local claims = b64url(p) or ''
    local exp = tonumber(claims:match('"exp"%s*:%s*(%d+)'))
    if exp and exp < ngx.time() then
        return nil
    end
    return claims:match('"sub"%s*:%s*"([%w._-]+)"')
end


local function command(args)
    local t = { '*', #args, '\r\n' }
    for _, a in ipairs(args) do
        a = tostring(a)
        t[#t + 1] = '$' .. #a .. '\r\n' .. a .. '\r\n'
    end
    return table.concat(t)
end

local function read_reply(sock)
    local line, err = sock:receive()
    if not line then
        return nil, err
    end
    local kind, rest = line:sub(1, 1), line:sub(2)
    if kind == ':' then
        return tonumber(rest)
    elseif kind == '+' then
        return rest
    elseif kind == '-' then
        return false, rest
    elseif kind == '$' then
        local n = tonumber(rest)
        if n < 0 then
            return ngx.null
        end
        local data = sock:receive(n + 2)
        return data and data:sub(1, n)
    elseif kind == '*' then
        local n = tonumber(rest)
        local a = {}
        for i = 1, n do
            local v, e = read_reply(sock)
            if v == nil then
                return nil, e
            end
            a[i] = v
        end
        return a
    end
    return nil, 'bad reply'
end

-- EVALSHA, loading the script on NOSCRIPT; the reply, or nil and an error
local function script(sha, body, keys, args)
    local sock = ngx.socket.tcp()
    sock:settimeouts(1000, 1000, 1000)
    local ok, err = sock:connect(conf.redis_host, conf.redis_port)
    if not ok then
        return nil, err
    end
    local cmd = { 'EVALSHA', sha, #keys }
    for _, k in ipairs(keys) do cmd[#cmd + 1] = k end
    for _, a in ipairs(args) do cmd[#cmd + 1] = a end
    sock:send(command(cmd))
    local reply, e = read_reply(sock)
    if reply == false and e:find('^NOSCRIPT') then
        sock:send(command({ 'SCRIPT', 'LOAD', body }))
        read_reply(sock)
        sock:send(command(cmd))
        reply, e = read_reply(sock)
    end
    if reply == nil then
        sock:close()
        return nil, e
    end
    sock:setkeepalive(10000, 256)
    if reply == false then
        return nil, e
    end
    return reply
end


function _M.hold()
    local p = project()
    if not p then
        ngx.header['WWW-Authenticate'] = 'Bearer error="invalid_token"'
        return ngx.exit(401)
    end

    local prefix = 'credits:{' .. p .. '}:'
    local keys = { prefix .. 'balance', prefix .. 'holds', prefix .. 'ledger' }
    local member = ngx.var.request_id .. ':' .. conf.price .. ':' .. conf.route
    local reply, err = script(conf.hold_sha, conf.hold, keys,
                              { member, conf.price, conf.ttl, '' })
    if not reply then
        ngx.log(ngx.ERR, 'hold failed: ', err)
        return ngx.exit(503)
    end
    -- the script's flat reply: code, balance
    if reply[1] ~= 1 then
        ngx.status = 402
        ngx.header['Content-Type'] = 'application/json'
        ngx.say('{"error":"insufficient_credits","required":', conf.price,
                ',"balance":', reply[2], '}')
        return ngx.exit(402)
    end

    ngx.ctx.hold = { keys = keys, member = member, id = ngx.var.request_id }
    ngx.header['X-Credits-Held'] = conf.price
    ngx.header['X-Credits-Balance'] = reply[2]
end


local function settle(premature, keys, args)
    local ok, err = script(conf.settle_sha, conf.settle, keys, args)
    if not ok then
        ngx.log(ngx.ERR, 'settle failed: ', err)
    end
end

function _M.settle()
    local h = ngx.ctx.hold
    if not h then
        return
    end
    local status = ngx.status
    local commit = status > 0 and status < 400
    ngx.timer.at(0, settle, h.keys,
                 { h.member, commit and conf.price or 0, status,
                   commit and 'commit' or 'release',
                   h.id, conf.price, conf.route })
end

return _M
