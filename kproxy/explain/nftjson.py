"""``nft -j list ruleset`` JSON for explain: the JSON is turned into the same model as
the text forms (kproxy.explain.nft), its rules into rule text, so one rule parser serves
every form."""

from __future__ import annotations

import json
from typing import Any, Dict

from kproxy.explain.nft import _PRIORITIES, NftError, NftRule, NftRuleset, _Reader, _tokens


def _jv(v: Any) -> str:
    """A JSON value (set element, right-hand side) as nft text."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, (int, float)):
        return str(int(v))
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return ",".join(_jv(x) for x in v)
    if isinstance(v, dict):
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        if "range" in v:
            a, b = v["range"]
            return f"{_jv(a)}-{_jv(b)}"
        if "concat" in v:
            return " . ".join(_jv(x) for x in v["concat"])
        if "set" in v:
            items = v["set"]
            if isinstance(items, list):
                return "{ " + ", ".join(_jelem(x) for x in items) + " }"
            return "{ " + _jv(items) + " }"
        if "elem" in v:
            e = v["elem"]
            text = _jv(e.get("val"))
            if e.get("comment"):
                text += f' comment "{e["comment"]}"'
            return text
        return _jexpr(v)
    raise NftError(f"unsupported JSON value {v!r}")


def _jverdict(v: Any) -> str:
    if isinstance(v, dict):
        for k in ("jump", "goto"):
            if k in v:
                return f"{k} {v[k]['target']}"
        for k in ("accept", "drop", "continue", "return", "reject"):
            if k in v:
                return k
    if isinstance(v, str):
        return v
    raise NftError(f"unsupported verdict {v!r}")


def _jelem(x: Any) -> str:
    if isinstance(x, list) and len(x) == 2:
        return f"{_jv(x[0])} : {_jverdict(x[1]) if isinstance(x[1], (dict, str)) else _jv(x[1])}"
    return _jv(x)


def _jexpr(e: Any) -> str:
    if not isinstance(e, dict):
        return _jv(e)
    if "payload" in e:
        p = e["payload"]
        return f"{p.get('protocol', 'th')} {p['field']}"
    if "meta" in e:
        return f"meta {e['meta']['key']}"
    if "ct" in e:
        return f"ct {e['ct']['key']}"
    if "fib" in e:
        f = e["fib"]
        return "fib " + " . ".join(f.get("flags", [])) + f" {f.get('result')}"
    if "numgen" in e:
        n = e["numgen"]
        off = f" offset {n['offset']}" if n.get("offset") else ""
        return f"numgen {n.get('mode', 'random')} mod {n['mod']}{off}"
    if "concat" in e:
        return " . ".join(_jexpr(x) for x in e["concat"])
    for op in ("&", "|", "^"):
        if op in e:
            a, b = e[op]
            return f"{_jexpr(a)} {op} {hex(b) if isinstance(b, int) else _jv(b)}"
    return _jv(e)


def _jstmt(s: Dict[str, Any]) -> str:
    if "match" in s:
        m = s["match"]
        left, right, op = _jexpr(m["left"]), m["right"], m.get("op", "==")
        rtext = _jv(right) if not isinstance(right, dict) or "set" in right or "prefix" in right \
            or "range" in right else _jexpr(right)
        if op in ("==", "in"):
            return f"{left} {rtext}" if "&" not in left else f"{left} == {rtext}"
        return f"{left} {op} {rtext}"
    if "vmap" in s:
        v = s["vmap"]
        data = v["data"]
        dtext = data if isinstance(data, str) else "{ " + ", ".join(_jelem(x) for x in data["set"]) + " }"
        return f"{_jexpr(v['key'])} vmap {dtext}"
    for k in ("jump", "goto"):
        if k in s:
            return f"{k} {s[k]['target']}"
    for k in ("accept", "drop", "continue", "return", "reject"):
        if k in s:
            return k
    for k in ("dnat", "snat"):
        if k in s:
            d = s[k]
            addr = d.get("addr")
            addr = _jv(addr) if addr is not None else ""
            port = d.get("port")
            if port is not None:
                addr = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
            return f"{k} to {addr}"
    if "masquerade" in s:
        return "masquerade"
    if "mangle" in s:
        m = s["mangle"]
        return f"{_jexpr(m['key'])} set {_jexpr(m['value'])}"
    if "set" in s:
        st = s["set"]
        return f"{st.get('op', 'update')} {st['set']} {{ {_jexpr(st['elem'])} }}"
    if "counter" in s or "log" in s or "limit" in s or "notrack" in s:
        return ""
    return "<" + ",".join(s) + ">"


def parse_json(text: str) -> NftRuleset:
    """``nft -j list ruleset`` output."""
    data = json.loads(text)
    rs = NftRuleset()
    for item in data.get("nftables", []):
        if "table" in item:
            rs.table(item["table"]["family"], item["table"]["name"])
        elif "chain" in item:
            c = item["chain"]
            ch = rs.table(c["family"], c["table"]).chain(c["name"])
            ch.type, ch.hook = c.get("type"), c.get("hook")
            if "prio" in c:
                prio = c["prio"]
                ch.priority = prio if isinstance(prio, int) else _PRIORITIES.get(str(prio), 0)
            ch.policy = c.get("policy", "accept")
        elif "set" in item or "map" in item:
            is_map = "map" in item
            s = item["map" if is_map else "set"]
            t = rs.table(s["family"], s["table"])
            ns = rs.add_set(t, s["name"], is_map, None)
            flags = s.get("flags", [])
            ns.flags = list(flags) if isinstance(flags, list) else [flags]
            if "timeout" in s:
                ns.timeout = f"{s['timeout']}s"
            for e in s.get("elem", []):
                if is_map and isinstance(e, list):
                    key, value = e
                    ktext, vtext = _jv(key), _jverdict(value)
                    comment = key.get("elem", {}).get("comment") if isinstance(key, dict) else None
                    ktext = _jv(key.get("elem", {}).get("val")) if isinstance(key, dict) and "elem" in key else ktext
                    ns.add([p.strip() for p in ktext.split(" . ")], vtext.split(), comment)
                else:
                    comment = e.get("elem", {}).get("comment") if isinstance(e, dict) else None
                    val = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
                    ns.add([p.strip() for p in _jv(val).split(" . ")], None, comment)
        elif "rule" in item:
            r = item["rule"]
            parts = [p for p in (_jstmt(s) for s in r.get("expr", [])) if p]
            if r.get("comment"):
                parts.append(f'comment "{r["comment"]}"')
            t = rs.table(r["family"], r["table"])
            c = t.chain(r["chain"])
            toks = _Reader(_tokens(" ".join(parts))).body("flat")
            c.rules.append(NftRule(c.name, len(c.rules) + 1, toks[0] if toks else []))
    return rs
