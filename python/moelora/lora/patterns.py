"""Bounded matching of PEFT's rank_pattern / alpha_pattern keys.

PEFT picks a module's rank and alpha with `re.match(rf"(.*\\.)?({key})$", name)`. Python's
backtracking matcher takes exponential time on some keys (`(a+)+b`, `(.*)*x`) and holds the GIL
while it does, so one hostile adapter_config.json would stall every thread of a server. Here a
key is parsed once (by Python's own regex parser) and compiled to a position automaton (Glushkov:
one state per character atom, no epsilon moves) that is run over the name a character at a time:
time linear in the name for a fixed key, whatever the key. The answer is the one `re.match`
gives, for every key this module accepts.

Bounds, each refused with a PatternError naming the key:
* keys of at most MAX_KEY_CHARS characters and MAX_POSITIONS character atoms once counted
  repeats (`x{3,40}`) are expanded;
* the features whose answer is not a property of the characters matched (back-references,
  lookarounds, conditional groups, possessive repeats, atomic groups, inline flags, anchors other
  than a leading `^` / `\\A` and a `$` / `\\Z` that ends the key or its final alternatives);
* module names of at most MAX_NAME_CHARS characters, and MATCH_SECONDS of matching in all for
  one adapter (a PatternSet), checked as the names are matched.
"""

from __future__ import annotations

import time

try:  # Python >= 3.11
    from re import _compiler as sre_compile
    from re import _constants as sre
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_compile
    import sre_constants as sre
    import sre_parse

MAX_KEY_CHARS = 1000
MAX_POSITIONS = 1000
MAX_NAME_CHARS = 1000
MATCH_SECONDS = 0.5
_STEP_CACHE_ENTRIES = 1 << 16

_CHARACTER_OPS = {sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN}
_REPEAT_OPS = {sre.MAX_REPEAT, sre.MIN_REPEAT}
_START_ANCHORS = {sre.AT_BEGINNING, sre.AT_BEGINNING_STRING}
_END_ANCHORS = {sre.AT_END, sre.AT_END_STRING}


class PatternError(ValueError):
    """A pattern key that cannot be matched within the bounds; the message says why."""


def _without_final_end(items: list) -> list:
    """The items with every `$` / `\\Z` that can only be met at the very end of the key removed
    (the match must end at the end of the name anyway): a trailing one, and those at the end of
    the alternatives or group the key ends with."""
    if not items:
        return items
    op, av = items[-1]
    if op is sre.AT and av in _END_ANCHORS:
        return _without_final_end(items[:-1])
    if op is sre.BRANCH:
        return items[:-1] + [(op, (av[0], [_without_final_end(list(a)) for a in av[1]]))]
    if op is sre.SUBPATTERN:
        group, add_flags, del_flags, body = av
        return items[:-1] + [(op, (group, add_flags, del_flags,
                                   _without_final_end(list(body))))]
    return items


class KeyMatcher:
    """One pattern key, compiled: `matches(name)` is `re.match(rf"(.*\\.)?({key})$", name)`."""

    def __init__(self, key: str):
        if not isinstance(key, str):
            raise PatternError(f"pattern key {key!r} is not a string")
        if len(key) > MAX_KEY_CHARS:
            raise PatternError(f"pattern key of {len(key)} characters is longer than "
                               f"{MAX_KEY_CHARS}")
        self.key = key
        try:
            parsed = sre_parse.parse(key)
        except (sre.error, RecursionError, OverflowError) as e:
            raise PatternError(f"pattern key {key!r} is not a valid regular expression: "
                               f"{e}") from None
        if parsed.state.flags & ~sre.SRE_FLAG_UNICODE:
            raise PatternError(f"pattern key {key!r} sets regex flags, which are not accepted")
        items = list(parsed)
        anchored = bool(items) and items[0][0] is sre.AT and items[0][1] in _START_ANCHORS
        if anchored:
            items = items[1:]
        items = _without_final_end(items)
        if not anchored:  # PEFT's prefix: any dotted path, or nothing
            items = list(sre_parse.parse(r"(?:.*\.)?")) + items
        self._atoms: list[tuple] = []  # position -> its (op, av) character item
        self._follow: list[int] = []  # position -> bit mask of the positions that may come next
        self._visits = 0  # items built, repeats expanded: bounds the work on `(){1000000}`
        self.nullable, self._first, self._last = self._sequence(items)
        self._singles = None  # per position, a compiled regex of its character atom alone
        self._accept: dict[str, int] = {}  # character -> positions that accept it
        self._steps: dict[tuple[int, str], int] = {}

    # -- construction ------------------------------------------------------------------------
    def _refuse(self, what: str):
        raise PatternError(f"pattern key {self.key!r} uses {what}, which is not accepted in "
                           f"rank_pattern / alpha_pattern")

    def _sequence(self, items) -> tuple[bool, int, int]:
        nullable, first, last = True, 0, 0
        for op, av in items:
            n, f, l = self._item(op, av)
            self._link(last, f)
            if nullable:
                first |= f
            last = l | (last if n else 0)
            nullable = nullable and n
        return nullable, first, last

    def _link(self, last: int, first: int) -> None:
        while last:
            low = last & -last
            self._follow[low.bit_length() - 1] |= first
            last ^= low

    def _item(self, op, av) -> tuple[bool, int, int]:
        self._visits += 1
        if self._visits > 20 * MAX_POSITIONS:
            raise PatternError(f"pattern key {self.key!r} is too complex: its repeats expand to "
                               f"more than {20 * MAX_POSITIONS} parts")
        if op in _CHARACTER_OPS:
            if len(self._atoms) >= MAX_POSITIONS:
                raise PatternError(f"pattern key {self.key!r} is too complex: more than "
                                   f"{MAX_POSITIONS} character positions once repeats are "
                                   f"expanded")
            self._atoms.append((op, av))
            self._follow.append(0)
            bit = 1 << (len(self._atoms) - 1)
            return False, bit, bit
        if op is sre.SUBPATTERN:
            _, add_flags, del_flags, body = av
            if add_flags or del_flags:
                self._refuse("scoped flags")
            return self._sequence(body)
        if op is sre.BRANCH:
            nullable, first, last = False, 0, 0
            for alternative in av[1]:
                n, f, l = self._sequence(alternative)
                nullable, first, last = nullable or n, first | f, last | l
            return nullable, first, last
        if op in _REPEAT_OPS:
            low, high, body = av
            nullable, first, last = True, 0, 0
            optional = 1 if high == sre.MAXREPEAT else high - low
            if low + optional > 20 * MAX_POSITIONS:
                raise PatternError(f"pattern key {self.key!r} is too complex: a repeat of "
                                   f"{low + optional} copies")
            # required copies, then optional ones (None) or one starred copy (True)
            copies = [False] * low + ([True] if high == sre.MAXREPEAT else [None] * optional)
            for kind in copies:
                self._visits += 1
                if self._visits > 20 * MAX_POSITIONS:
                    raise PatternError(f"pattern key {self.key!r} is too complex: its repeats "
                                       f"expand to more than {20 * MAX_POSITIONS} parts")
                n, f, l = self._sequence(body)
                if kind is True:  # x*: its last positions may start it again
                    self._link(l, f)
                if kind is not False:
                    n = True
                self._link(last, f)
                if nullable:
                    first |= f
                last = l | (last if n else 0)
                nullable = nullable and n
            return nullable, first, last
        if op is sre.AT:
            self._refuse("an anchor inside the pattern")
        names = {sre.GROUPREF: "a back-reference", sre.GROUPREF_EXISTS: "a conditional group",
                 sre.ASSERT: "a lookahead or lookbehind", sre.ASSERT_NOT: "a negative lookaround",
                 getattr(sre, "POSSESSIVE_REPEAT", None): "a possessive repeat",
                 getattr(sre, "ATOMIC_GROUP", None): "an atomic group"}
        self._refuse(names.get(op, f"the regex construct {op}"))

    # -- matching ----------------------------------------------------------------------------
    def _accepting(self, char: str) -> int:
        mask = self._accept.get(char)
        if mask is None:
            if self._singles is None:
                state = sre_parse.State()
                state.flags = sre.SRE_FLAG_UNICODE
                self._singles = [sre_compile.compile(sre_parse.SubPattern(state, [item]),
                                                     state.flags) for item in self._atoms]
            mask = 0
            for position, single in enumerate(self._singles):
                if single.fullmatch(char):
                    mask |= 1 << position
            self._accept[char] = mask
        return mask

    def _next(self, active: int, char: str) -> int:
        key = (active, char)
        following = self._steps.get(key)
        if following is None:
            following, rest = 0, active
            while rest:
                low = rest & -rest
                following |= self._follow[low.bit_length() - 1]
                rest ^= low
            following &= self._accepting(char)
            if len(self._steps) < _STEP_CACHE_ENTRIES:
                self._steps[key] = following
        return following

    def matches(self, name: str, deadline: float | None = None) -> bool:
        if len(name) > MAX_NAME_CHARS:
            raise PatternError(f"module name of {len(name)} characters is longer than "
                               f"{MAX_NAME_CHARS}")
        if not name:
            return self.nullable
        active = self._first & self._accepting(name[0])
        for index in range(1, len(name)):
            if not active:
                return False
            active = self._next(active, name[index])
            if deadline is not None and index % 64 == 0 and time.monotonic() > deadline:
                raise PatternError(f"matching pattern key {self.key!r} took longer than "
                                   f"{MATCH_SECONDS} s")
        return bool(active & self._last)


class PatternSet:
    """An ordered {key: value} pattern dict of one adapter: `lookup(name)` gives the first key
    that matches (PEFT's rule), at most MATCH_SECONDS of matching over all lookups."""

    def __init__(self, patterns: dict):
        self.matchers = [KeyMatcher(key) for key in patterns]
        self._found: dict[str, str | None] = {}
        self._spent = 0.0

    def lookup(self, name: str) -> str | None:
        if name in self._found:
            return self._found[name]
        start = time.monotonic()
        deadline = start + MATCH_SECONDS - self._spent
        found = None
        try:
            for matcher in self.matchers:
                if time.monotonic() > deadline:
                    raise PatternError(f"matching the pattern keys took longer than "
                                       f"{MATCH_SECONDS} s")
                if matcher.matches(name, deadline):
                    found = matcher.key
                    break
        finally:
            self._spent += time.monotonic() - start
        self._found[name] = found
        return found
