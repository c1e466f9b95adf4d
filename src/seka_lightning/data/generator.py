"""Seeded, procedural generator of the synthetic QA pairs that SEKA projections are learned from (SPEC §3).

A pair holds two unrelated one-sentence contexts about invented entities, a question about each, and each
answer as a verbatim span of its context: ``{"id", "context_1", "question_1", "answer_1", "context_2",
"question_2", "answer_2"}``. Pure Python (``random.Random(seed)``, no network, no language model): the same
seed, count and split give a byte-identical file. Every invented word belongs to one of two partitions
(``train`` / ``heldout``) by a stable hash, so files generated for different splits never share a name.

Run ``python -m seka_lightning.data.generator --n 2000 --seed 0 --out data/synthetic_qa.jsonl`` or
``python -m seka_lightning.data.generator --config configs/data/generate.yaml``.
"""

import json
import logging
import os
import re
import statistics
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Literal

from jsonargparse import CLI

log = logging.getLogger(__name__)

Split = Literal["train", "heldout"]
Pair = dict[str, object]
FIELDS: tuple[str, ...] = ("id", "context_1", "question_1", "answer_1", "context_2", "question_2", "answer_2")

# One in five invented words belongs to the held-out partition (crc32 is stable across runs and platforms).
_HELDOUT_MODULUS = 5
_MAX_ATTEMPTS = 2000
_SUBJECT_ANSWER_WEIGHT = 0.5
_WORD = re.compile(r"[^\W_]+(?:[-‑'’][^\W_]+)*")
_LETTERS = re.compile(r"[^\W\d_]+")
_AWKWARD = re.compile(r"(.)\1\1|ii|uu|[aeiou]{3}")  # invented names that read badly
_STOPWORDS = frozenset("a an the of in on at to for with from by and or is are was were do does did its their".split())

# ---------------------------------------------------------------------------------------------------------
# Vocabulary. "{N}" in a phrase is replaced by a freshly invented name of the active split.
# ---------------------------------------------------------------------------------------------------------

_ONSETS = (
    "Al", "Bel", "Bri", "Cal", "Dor", "El", "Fen", "Gal", "Hal", "Ith", "Jor", "Kal", "Kes", "Lor", "Mar",
    "Mir", "Nal", "Or", "Pel", "Quel", "Ros", "Sel", "Tal", "Tor", "Ul", "Var", "Ves", "Wen", "Yr", "Zan",
    "Bram", "Cor", "Dra", "Ev", "Gil", "Hes", "Isk", "Lum", "Nor", "Ost", "Rav", "Sar", "Thal", "Vor",
)  # fmt: skip
_MIDDLES = ("", "", "", "a", "e", "i", "o", "an", "en", "ar", "or", "il", "is", "u")
_CODAS = (
    "rel", "mir", "une", "dor", "wyn", "ath", "ith", "ora", "ell", "ek", "ast", "hold", "mere", "vale", "ton",
    "gard", "mont", "wick", "moor", "den", "reth", "ys", "ara", "und", "ric", "os", "in", "ane", "esh", "ov",
)  # fmt: skip
_COMPOUND_HEADS = (
    "Ember", "Frost", "Storm", "Moon", "Sun", "Star", "Ash", "Dawn", "Dusk", "Night", "Thorn", "Mist", "Gloom",
    "Brine", "Cinder", "Glimmer", "Rime", "Salt", "Tide", "Wild", "Amber", "Copper", "Bramble", "Fern", "Gale",
    "Quill", "Hollow", "Raven", "Willow", "Flint",
)  # fmt: skip
_COMPOUND_TAILS = (
    "forge", "veil", "song", "wood", "spire", "shard", "glass", "bound", "born", "mere", "fall", "reach",
    "wright", "crest", "marsh", "wick", "brook", "watch", "hold", "gate", "root", "wind", "stone", "haven",
)  # fmt: skip

# Per category: (plural kinds, singular kinds). Singular group/event kinds also read "the {kind} of {N}".
_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "group": (
        ("Wardens", "Scribes", "Mariners", "Weavers", "Smiths", "Monks", "Riders", "Heralds", "Couriers",
         "Keepers", "Alchemists", "Shepherds", "Lamplighters", "Cartographers", "Glassblowers", "Beekeepers",
         "Archivists", "Ferrymen", "Masons", "Pilgrims", "Sentinels", "Druids", "Seers", "Minstrels",
         "Falconers", "Brewers", "Tinkers", "Rangers", "Healers", "Potters", "Bellringers", "Divers",
         "Astronomers", "Gardeners"),
        ("Guild", "Order", "Circle", "Company", "Fellowship", "League", "Clan", "Brotherhood", "Sisterhood",
         "Council"),
    ),
    "creature": (
        ("Falcons", "Serpents", "Moths", "Stags", "Herons", "Foxes", "Beetles", "Owls", "Eels", "Wolves",
         "Tortoises", "Ravens", "Salamanders", "Lynxes", "Crickets", "Otters", "Hares", "Swans", "Toads",
         "Bats", "Cranes", "Lizards", "Badgers", "Wasps", "Goats"),
        (),
    ),
    "object": (
        ("Lanterns", "Mirrors", "Bells", "Looms", "Drums", "Compasses", "Clocks", "Banners", "Chimes", "Lenses",
         "Keys", "Harps", "Masks", "Scales", "Urns", "Gears", "Kites", "Candles", "Crowns", "Flutes",
         "Sundials", "Anchors", "Goblets", "Tapestries"),
        ("Bell", "Compass", "Clock", "Loom", "Mirror", "Lantern", "Harp", "Crown", "Engine", "Orrery",
         "Telescope", "Chalice"),
    ),
    "place": (
        ("Orchards", "Canals", "Spires", "Marshes", "Terraces", "Gardens", "Caverns", "Mills", "Docks",
         "Quarries", "Vineyards", "Springs", "Towers", "Bridges", "Baths", "Stepwells", "Greenhouses",
         "Lighthouses", "Archives"),
        ("Lighthouse", "Library", "Market", "Observatory", "Monastery", "Harbour", "Citadel", "Abbey", "Mill",
         "Academy", "Fortress", "Tower", "Bathhouse"),
    ),
    "event": (
        ("Games", "Races", "Revels"),
        ("Festival", "Fair", "Regatta", "Vigil", "Procession", "Tournament", "Carnival", "Pilgrimage", "Feast"),
    ),
}  # fmt: skip
_CATEGORY_WEIGHTS = {"group": 4, "creature": 3, "object": 3, "place": 3, "event": 1}


@dataclass(frozen=True)
class _Pool:
    """Noun phrases an answer slot draws from; ``wh`` asks for them ("What" or "Whom")."""

    phrases: tuple[str, ...]
    adjectives: tuple[str, ...] = ()
    qualifiers: tuple[str, ...] = ()
    wh: str = "What"


_PERSONS = (
    "the Duchess of {N}", "the Duke of {N}", "the Queen of {N}", "the King of {N}", "the Abbess of {N}",
    "the Margrave of {N}", "the Regent of {N}", "the Harbourmaster of {N}", "the Archbishop of {N}",
    "the Countess of {N}", "the Mayor of {N}", "the High Priestess of {N}", "the last Prince of {N}",
    "{N} the Bold", "{N} the Younger", "{N} the Quiet", "{N} the Wise", "{N} the Lame", "{N} the Fair",
    "a blind ferryman named {N}", "a young weaver called {N}", "a retired admiral named {N}",
    "a wandering monk called {N}", "a travelling tinker named {N}", "a widowed baker called {N}",
    "an exiled poet named {N}", "a clockmaker called {N}",
)  # fmt: skip

_POOLS: dict[str, _Pool] = {
    "goods": _Pool(
        ("honey", "salt", "glass beads", "copper wire", "lamp oil", "wool", "amber resin", "river pearls",
         "baskets", "needles", "ink", "pepper", "rope", "candles", "clay jars", "silk thread", "tea", "bread",
         "nails", "kites", "cheese", "soap", "parchment", "vinegar", "lace", "tiles", "perfume", "sugar",
         "figs", "dried fish"),
        ("bitter", "fragrant", "heavy", "tiny", "polished", "smoked", "golden", "crimson", "salted", "rare",
         "cheap", "blue", "spiced", "fine", "coarse"),
        ("that glow under moonlight", "from the southern hills", "wrapped in oilcloth", "of every colour",
         "that never spoil", "sealed with wax", "stamped with a crescent", "sold by weight",
         "that taste of smoke", "packed in straw"),
    ),
    "guarded": _Pool(
        ("the northern gate", "a sealed vault", "the royal archive", "the old bridge", "the harbour chain",
         "a sunken shrine", "the eastern pass", "the seed vault", "the mountain road", "a buried crown",
         "the last well", "the lighthouse stairs", "the salt roads", "the border stones", "the orchard walls",
         "the granary doors", "the sleeping king", "the river fords", "the tomb of {N}", "the treasury of {N}"),
        ("old", "forgotten", "crumbling", "hidden", "western", "silent", "sacred", "narrow"),
        ("beneath the city", "of the old kings", "beyond the marsh", "on the northern border",
         "that no map records"),
    ),
    "carried": _Pool(
        ("letters", "sacks of grain", "lanterns", "sealed scrolls", "spare sails", "the morning post",
         "medicine", "fresh water", "maps", "seeds", "messages", "firewood", "the bones of saints", "news",
         "spices", "prayer flags", "tax ledgers", "honey cakes", "wedding gifts"),
        ("secret", "urgent", "heavy", "fragile", "forbidden", "stolen", "precious"),
        ("across the frozen lake", "between the island towns", "for the harbour master",
         "over the mountain passes", "to distant villages", "in waxed leather bags"),
    ),
    "tended": _Pool(
        ("the moss gardens", "beehives", "the sacred flames", "olive groves", "the tide pools",
         "herds of white goats", "the lamp towers", "silkworms", "the orchards", "the graves of sailors",
         "mushroom beds", "the herb terraces", "the reed beds", "the vines"),
        ("ancient", "terraced", "quiet", "royal", "sunken"),
    ),
    "studied": _Pool(
        ("the tides", "old star charts", "forgotten languages", "the migration of eels", "cloud shapes",
         "bird song", "weather omens", "the growth of lichen", "ancient coins", "the movement of glaciers",
         "dream records", "the songs of whales", "river silt", "the patterns of frost",
         "the lost writings of {N}"),
    ),
    "texts": _Pool(
        ("old sermons", "star tables", "court records", "love letters", "recipes", "treaties", "ship logs",
         "hymns", "maps of the coast", "the laws of the city", "genealogies", "riddles",
         "the chronicles of {N}"),
        ("faded", "forbidden", "ancient", "secret", "banned"),
    ),
    "brewed": _Pool(
        ("cider", "black tea", "honey wine", "pine beer", "fever tonics", "plum brandy", "nettle soup",
         "barley ale", "cough syrup", "mint cordial"),
        ("strong", "sweet", "cloudy", "dark", "sour"),
    ),
    "woven": _Pool(
        ("sails", "carpets", "fishing nets", "tapestries", "rope ladders", "cloaks", "prayer mats",
         "hammocks", "shrouds", "tents"),
        ("striped", "waterproof", "enormous", "delicate", "plain"),
        ("from nettle fibre", "of spun glass", "that never tear", "for the royal fleet"),
    ),
    "repaired": _Pool(
        ("clocks", "fishing boats", "the city walls", "broken bells", "old roads", "windmills", "organ pipes",
         "cart wheels", "roof tiles", "the aqueduct of {N}"),
    ),
    "gathered": _Pool(
        ("driftwood", "feathers", "mushrooms", "sea glass", "rainwater", "herbs", "pine resin", "seashells",
         "old coins", "wild honey", "acorns", "snail shells", "fallen stars"),
        ("rare", "tiny", "blue", "green", "bleached"),
        ("from the shoreline", "after each storm", "in woven baskets"),
    ),
    "mapped": _Pool(
        ("the coastline", "underground rivers", "the night sky", "the ocean floor", "the salt caves",
         "forgotten roads", "the shifting dunes", "trade winds", "the sewers of {N}"),
    ),
    "sung": _Pool(
        ("lost ships", "the first kings", "distant stars", "the great flood", "drowned cities", "the old gods",
         "the harvest", "ancient battles", "the fall of {N}"),
    ),
    "dyes": _Pool(
        ("crushed beetles", "walnut husks", "saffron", "indigo", "madder root", "sea snail ink",
         "onion skins", "oak bark", "blackberry juice"),
    ),
    "prey": _Pool(
        ("silver minnows", "field mice", "river crabs", "marsh frogs", "sparrows", "grasshoppers",
         "snails", "carp", "shrimp", "dragonflies", "water beetles"),
        ("small", "sleeping", "blind", "golden", "spotted"),
        ("that live in the reeds", "from the shallows"),
    ),
    "food": _Pool(
        ("wild figs", "seaweed", "honeycomb", "thistles", "fallen apples", "lichen", "clover", "river weed",
         "sweet roots", "berries"),
        ("ripe", "frozen", "rotting", "bitter"),
    ),
    "nesting": _Pool(
        ("dry reeds", "spider silk", "fishbones", "tufts of wool", "mud and straw", "broken shells",
         "pine needles", "copper shavings", "paper scraps", "seaweed"),
    ),
    "hidden": _Pool(
        ("stolen rings", "seeds", "shiny buttons", "acorns", "old keys", "scraps of silver", "pebbles"),
    ),
    "followed": _Pool(
        ("the fishing boats", "the shepherds", "the full moon", "the warm currents", "migrating whales",
         "the caravans", "the river barges"),
    ),
    "marked": _Pool(
        ("the hours of the night watch", "the start of the harvest", "the change of the tide",
         "each royal birth", "the arrival of ships", "the end of the market day", "noon", "the first frost"),
    ),
    "lit": _Pool(
        ("the harbour steps", "the mountain road", "the old cemetery", "the bridge", "the palace gardens",
         "the mine shafts", "the narrow alleys", "the temple stairs", "the streets of {N}"),
        ("steep", "winding", "flooded", "crooked"),
    ),
    "shown": _Pool(
        ("the faces of the drowned", "distant storms", "the future", "hidden doors", "the stars at noon",
         "forgotten memories", "the way home", "true names"),
    ),
    "summoned": _Pool(
        ("the fishing fleet", "the town guard", "the spring rains", "the faithful to prayer", "the lost sheep",
         "the ferry", "the night birds", "the council of {N}"),
    ),
    "held": _Pool(
        ("old wine", "the ashes of kings", "rainwater", "the city charter", "sacred oil", "secret letters",
         "a thousand books", "grain for winter", "seeds from every island", "the crown jewels", "salted fish",
         "the heart of {N}"),
    ),
    "measured": _Pool(
        ("the depth of the harbour", "the passing hours", "the weight of gold", "the height of the tides",
         "rainfall", "the speed of the wind", "the heat of forges"),
    ),
    "pointed": _Pool(
        ("the nearest water", "the lost city", "true north", "the rising moon", "buried treasure",
         "the pole star", "the tomb of {N}"),
    ),
    "sheltered": _Pool(
        ("migrating birds", "lost travellers", "orphaned foxes", "shipwrecked sailors", "wandering monks",
         "rare orchids", "refugees from {N}"),
    ),
    "grown": _Pool(
        ("blue pumpkins", "night lilies", "bitter oranges", "black grapes", "giant mushrooms",
         "medicinal herbs", "pale roses", "olives", "rice", "pepper vines"),
    ),
    "honoured": _Pool(
        ("the drowned sailors", "the founding queen", "the river spirits", "the city's bakers",
         "fallen soldiers", "the old gods", "the saints of {N}", "the first settlers of {N}"),
        wh="Whom",
    ),
    "celebrated": _Pool(
        ("the longest night", "the end of the monsoon", "the first snowfall", "the founding of the city",
         "the salmon run", "the new year", "the blossoming of the plum trees", "the return of the swallows"),
    ),
    "crowds": _Pool(
        ("merchants from across the sea", "thousands of pilgrims", "jugglers and poets", "horse traders",
         "the best archers in the land", "travelling musicians", "scholars from distant cities",
         "fishermen from every village"),
    ),
    "masters": _Pool(
        (*_PERSONS, "an old hermit", "the river goddess", "the harbour council", "the moon priests"),
        wh="Whom",
    ),
    "materials": _Pool(
        ("bronze", "whalebone", "river clay", "black walnut", "frosted glass", "driftwood", "soapstone",
         "copper", "ivory", "red cedar", "volcanic glass", "braided reeds", "pewter", "silver birch",
         "meteor iron", "sea coral"),
        ("dark", "polished", "pale", "salvaged", "green", "hammered"),
        ("from the northern mines", "salvaged from shipwrecks", "from {N}", "traded from {N}"),
    ),
}  # fmt: skip

# Transitive verbs per category: (verb phrase, object pool, allowed adjuncts). A passive verb phrase is the
# participle (with its preposition); "{poss}" becomes "their" or "its". Adjunct letters: t(ime), p(lace),
# m(anner), i(nstrument).
_TRANSITIVE: dict[str, tuple[tuple[str, str, str, bool], ...]] = {
    "group": (
        ("guard", "guarded", "tm", False), ("carry", "carried", "tm", False), ("craft", "goods", "tpi", False),
        ("sell", "goods", "tp", False), ("trade", "goods", "tp", False), ("gather", "gathered", "tpi", False),
        ("tend", "tended", "tmi", False), ("study", "studied", "tpm", False), ("copy", "texts", "tpm", False),
        ("brew", "brewed", "tpi", False), ("weave", "woven", "tpi", False), ("repair", "repaired", "tmi", False),
        ("map", "mapped", "tmi", False), ("sing of", "sung", "tpm", False),
        ("dye {poss} cloth with", "dyes", "tp", False), ("serve", "masters", "tm", False),
        ("collect", "gathered", "tpi", False),
    ),
    "creature": (
        ("hunt", "prey", "tpm", False), ("eat", "food", "tp", False), ("guard", "guarded", "tm", False),
        ("carry", "carried", "tm", False), ("collect", "gathered", "tp", False),
        ("build {poss} nests from", "nesting", "tp", False), ("hide", "hidden", "tp", False),
        ("follow", "followed", "tm", False), ("serve", "masters", "t", False),
    ),
    "object": (
        ("mark", "marked", "p", False), ("light", "lit", "t", False), ("show", "shown", "t", False),
        ("summon", "summoned", "t", False), ("hold", "held", "p", False), ("measure", "measured", "p", False),
        ("point toward", "pointed", "t", False), ("made of", "materials", "", True),
        ("carved from", "materials", "p", True), ("cast in", "materials", "p", True),
        ("forged from", "materials", "p", True),
    ),
    "place": (
        ("produce", "goods", "t", False), ("supply", "goods", "t", False), ("shelter", "sheltered", "t", False),
        ("hold", "held", "", False), ("grow", "grown", "t", False), ("export", "goods", "t", False),
        ("built from", "materials", "", True), ("paved with", "materials", "", True),
    ),
    "event": (
        ("honour", "honoured", "p", False), ("celebrate", "celebrated", "p", False),
        ("draw", "crowds", "p", False), ("attract", "crowds", "p", False),
    ),
}  # fmt: skip

# Intransitive verbs per category; events are passive or phrasal ("held", "take place").
_INTRANSITIVE: dict[str, tuple[tuple[str, bool], ...]] = {
    "group": tuple((v, False) for v in (
        "gather", "feast", "sing", "pray", "march", "fast", "dance", "meet", "train", "camp", "bathe")),
    "creature": tuple((v, False) for v in (
        "hatch", "migrate", "sing", "moult", "nest", "hunt", "swarm", "sleep", "gather", "feed", "breed")),
    "object": tuple((v, False) for v in ("glow", "ring", "hum", "chime", "sway", "turn", "flicker", "rust")),
    "place": tuple((v, False) for v in ("flood", "freeze", "fill with mist", "glow", "fall silent", "echo")),
    "event": (("held", True), ("take place", False), ("begin", False), ("end", False)),
}  # fmt: skip

_TIMES = (
    "at dusk", "at dawn", "at midnight", "at first light", "every spring", "every autumn", "each winter",
    "during the first thaw", "on the longest night of the year", "at the turn of each tide",
    "when the river freezes", "before the harvest moon", "after every storm", "shortly before sunrise",
    "once every hundred years", "on the last day of summer", "during the rainy season",
    "in the hour before dawn", "on market days", "when the comet returns", "at the full moon",
    "during the salt harvest", "after the first snowfall", "on feast days", "at low tide", "in early spring",
    "late in the autumn", "under the new moon", "every {ORD} {PERIOD}", "on the {ORD} day of each month",
)  # fmt: skip
_ORDINALS = ("second", "third", "fourth", "fifth", "sixth", "seventh", "ninth", "twelfth")
_PERIODS = ("year", "winter", "summer", "spring", "month", "week")
_PREPOSITIONS = (
    "beside", "beneath", "above", "along", "behind", "near", "across", "on", "in", "at the edge of",
    "on the far side of", "in the shadow of", "below", "around", "within sight of",
)  # fmt: skip
_LOCATIONS = (
    "the salt marshes", "the old quarry", "the northern cliffs", "the river delta", "a hidden valley",
    "the lower town", "the palace gardens", "the harbour walls", "the frozen lake", "the eastern hills",
    "the pine forest", "the market square", "the sea caves", "the desert road", "the black lagoon",
    "the {N} Hills", "Lake {N}", "Mount {N}", "the {N} River", "the town of {N}", "{N} Bay",
    "the {N} Marshes", "the {N} Forest", "the Isle of {N}", "the {N} Pass", "the ruins of {N}",
    "the {N} Valley", "the walls of {N}", "the {N} Bridge",
)  # fmt: skip
_INSTRUMENTS = (
    "bone needles", "nets of braided kelp", "silver hooks", "long bronze poles", "iron tongs",
    "willow baskets", "glass lenses", "tiny brushes", "heavy chains", "reed flutes", "whalebone combs",
    "clay moulds", "copper sieves", "cedar ladders",
)  # fmt: skip
_MANNERS = (
    "in complete silence", "in single file", "in pairs", "in secret", "in total darkness", "in slow circles",
    "by lamplight", "by hand", "without a word", "with great care", "in perfect unison", "by starlight",
    "in the old way", "at great speed",
)  # fmt: skip
_COLOURS = (
    "violet", "amber", "teal", "crimson", "ochre", "silver", "jade", "cobalt", "saffron", "rose", "slate grey",
    "ivory", "scarlet", "indigo", "moss green", "copper", "charcoal", "lilac", "turquoise", "gold",
)  # fmt: skip
_SHADES = ("pale", "deep", "dusky", "bright", "smoky", "rusty", "dark", "soft")
_PARTS: dict[str, tuple[str, ...]] = {
    "group": ("cloaks", "robes", "banners", "sails", "boots", "hoods", "sashes", "tents"),
    "creature": ("feathers", "scales", "wings", "eyes", "shells", "tails", "antlers", "claws"),
    "object": ("handles", "rims", "lids", "chains", "tassels", "cases", "ribbons"),
    "place": ("roofs", "doors", "walls", "shutters", "flags", "tiles", "gates"),
    "event": ("lanterns", "ribbons", "banners", "masks", "tents"),
}
# Per category: (verb, counted unit, whether the count is small: 2-19 rather than up to 1999).
_COUNTS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "group": (("own", "ships", False), ("keep", "hives", False), ("train", "apprentices", False),
              ("count", "members", False), ("keep", "ledgers", False), ("own", "wagons", False),
              ("command", "watchtowers", True)),
    "creature": (("lay", "eggs", True), ("have", "legs", True), ("have", "eyes", True), ("raise", "chicks", True),
                 ("have", "wings", True), ("guard", "burrows", False)),
    "object": (("have", "strings", False), ("have", "keys", False), ("have", "spokes", False),
               ("carry", "lenses", True), ("bear", "runes", False), ("have", "faces", True),
               ("have", "hands", True)),
    "place": (("have", "gates", True), ("have", "towers", True), ("have", "rooms", False), ("have", "wells", False),
              ("have", "steps", False), ("contain", "chambers", False), ("have", "windows", False),
              ("house", "families", False)),
    "event": (("have", "rounds", True), ("feature", "contests", False), ("include", "races", False),
              ("award", "prizes", False)),
}  # fmt: skip
_NUMBER_UNITS = (
    "", "", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
_NUMBER_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_DURATION_UNITS = ("days", "nights", "weeks", "hours", "months")
_DURATIONS_FIXED = (
    "a single afternoon", "from dusk until dawn", "an entire month", "a whole season", "one long night",
    "half a day",
)  # fmt: skip
_FOUNDING: dict[str, tuple[str, ...]] = {
    "group": ("founded", "started", "organised"),
    "creature": ("tamed", "bred", "discovered"),
    "object": ("made", "forged", "carved", "designed"),
    "place": ("built", "founded", "designed"),
    "event": ("founded", "started", "organised"),
}
_DWELLING: dict[str, tuple[str, ...]] = {
    "group": ("live", "dwell", "work"),
    "creature": ("live", "nest", "sleep"),
    "object": ("hang", "stand", "rest"),
    "place": ("stand", "lie", "rise"),
    "event": (),
}
# Words the templates themselves use (everything else a context holds is a vocabulary word or a name).
_TEMPLATE_WORDS = (
    "the what who whom where when how with many long colour does do did is are was were has have their its "
    "which and for by of in year lasts last named called a an"
)


def _vocabulary_words() -> frozenset[str]:
    texts: list[str] = [_TEMPLATE_WORDS, *_ORDINALS, *_PERIODS, *_PREPOSITIONS, *_LOCATIONS, *_TIMES]
    texts += [*_INSTRUMENTS, *_MANNERS, *_COLOURS, *_SHADES, *_NUMBER_UNITS, *_NUMBER_TENS]
    texts += [*_DURATION_UNITS, *_DURATIONS_FIXED]
    for plural, singular in _KINDS.values():
        texts += [*plural, *singular]
    for pool in _POOLS.values():
        texts += [*pool.phrases, *pool.adjectives, *pool.qualifiers]
    for entries in _TRANSITIVE.values():
        texts += [verb for verb, *_ in entries]
    for table in (_PARTS, _FOUNDING, _DWELLING):
        texts += [w for words in table.values() for w in words]
    texts += [verb for entries in _INTRANSITIVE.values() for verb, _ in entries]
    texts += [w for entries in _COUNTS.values() for verb, unit, _ in entries for w in (verb, unit)]
    words = {w.lower() for text in texts for w in _LETTERS.findall(text.replace("{", " ").replace("}", " "))}
    words |= {_third_person(w) for w in words}  # the singular forms the grammar helpers produce
    return frozenset(words - {"n", "poss", "ord", "period"})


def name_split(word: str) -> Split:
    """The partition an invented word belongs to: a stable hash puts one word in five into ``heldout``."""
    return "heldout" if zlib.crc32(word.lower().encode("utf-8")) % _HELDOUT_MODULUS == 0 else "train"


def _third_person(verb_phrase: str) -> str:
    """Inflect the first word of a verb phrase for a singular subject ("carry of" -> "carries of")."""
    head, _, rest = verb_phrase.partition(" ")
    if head == "have":
        head = "has"
    elif head.endswith(("s", "sh", "ch", "x", "z")):
        head += "es"
    elif head.endswith("y") and head[-2:-1] not in ("a", "e", "o", "u"):
        head = head[:-1] + "ies"
    else:
        head += "s"
    return f"{head} {rest}" if rest else head


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class _Subject:
    """An invented entity: ``name`` is the answer form ("Vorrel Smiths"), ``np`` the sentence form."""

    name: str
    plural: bool
    category: str

    @property
    def np(self) -> str:
        return f"the {self.name}"

    @property
    def do(self) -> str:
        return "do" if self.plural else "does"

    @property
    def be(self) -> str:
        return "are" if self.plural else "is"

    @property
    def was(self) -> str:
        return "were" if self.plural else "was"

    @property
    def wh(self) -> str:
        return "Who" if self.category == "group" else "What"

    @property
    def rel(self) -> str:
        return "who" if self.category == "group" else "which"

    def fill(self, phrase: str) -> str:
        return phrase.replace("{poss}", "their" if self.plural else "its")

    def verb(self, phrase: str) -> str:
        """The verb phrase agreeing with this subject."""
        return self.fill(phrase if self.plural else _third_person(phrase))


@dataclass(frozen=True)
class _Verb:
    """A verb phrase that can be stated ("crafts", "are cast in") and asked about ("do ... craft")."""

    phrase: str
    passive: bool

    def finite(self, s: _Subject) -> str:
        return f"{s.be} {s.fill(self.phrase)}" if self.passive else s.verb(self.phrase)

    def ask(self, wh: str, s: _Subject, rest: str = "") -> str:
        """A question about a slot after the verb, e.g. "What do the Vorrel Smiths craft?"."""
        aux = s.be if self.passive else s.do
        return f"{wh} {aux} {s.np} {s.fill(self.phrase)}{rest}?"

    def ask_subject(self, wh: str, s: _Subject, rest: str) -> str:
        """A question whose answer is the subject, e.g. "Who crafts fine rope?"."""
        verb = f"is {s.fill(self.phrase)}" if self.passive else s.fill(_third_person(self.phrase))
        return f"{wh} {verb}{rest}?"


@dataclass(frozen=True)
class _Fact:
    """One context with the question asked about it and its answer span."""

    context: str
    question: str
    answer: str
    subject: str


@dataclass(frozen=True)
class _Adjunct:
    text: str  # as it appears in the context
    answer: str  # the span a question about it targets
    wh: str  # the question word that asks for it


# A frame turns a subject into a context and the (question, answer) options it supports.
_Frame = Callable[["_Writer", _Subject], tuple[str, list[tuple[str, str]]]]


class _Writer:
    """Draws names, phrases and facts from one ``Random`` for one split."""

    def __init__(self, rng: Random, split: Split) -> None:
        self.rng = rng
        self.split = split

    def invent(self) -> str:
        """An invented word of this writer's split; never a vocabulary word, never awkward to read."""
        for _ in range(_MAX_ATTEMPTS):
            if self.rng.random() < 0.3:
                word = self.rng.choice(_COMPOUND_HEADS) + self.rng.choice(_COMPOUND_TAILS)
            else:
                word = self.rng.choice(_ONSETS) + self.rng.choice(_MIDDLES) + self.rng.choice(_CODAS)
            if _AWKWARD.search(word.lower()) or word.lower() in FIXED_VOCABULARY:
                continue
            if name_split(word) == self.split:
                return word
        raise RuntimeError(f"could not invent a {self.split} name in {_MAX_ATTEMPTS} attempts")

    def fill_names(self, phrase: str) -> str:
        while "{N}" in phrase:
            phrase = phrase.replace("{N}", self.invent(), 1)
        return phrase

    def phrase(self, pool_name: str) -> str:
        """A noun phrase from a pool, sometimes with an adjective and a qualifier (varies answer length)."""
        pool = _POOLS[pool_name]
        text = self.rng.choice(pool.phrases)
        if pool.adjectives and "{N}" not in text and self.rng.random() < 0.45:
            adjective = self.rng.choice(pool.adjectives)
            det, _, rest = text.partition(" ")
            if det in ("the", "a", "an") and rest:
                article = det if det == "the" else ("an" if adjective[0] in "aeiou" else "a")
                text = f"{article} {adjective} {rest}"
            else:
                text = f"{adjective} {text}"
        if pool.qualifiers and self.rng.random() < 0.3:
            text = f"{text} {self.rng.choice(pool.qualifiers)}"
        return self.fill_names(text)

    def number(self, *, small: bool = False) -> str:
        """A count in words ("seventeen", "forty-two") or digits ("1336"); ``small`` keeps it in 2-19."""
        r = self.rng.random()
        if small or r < 0.45:
            return self.rng.choice(_NUMBER_UNITS[2:])
        if r < 0.8:
            tens = self.rng.randrange(2, 10)
            unit = self.rng.randrange(0, 10)
            return _NUMBER_TENS[tens] + (f"-{_NUMBER_UNITS[unit]}" if unit >= 2 else "")
        return str(self.rng.randrange(100, 2000))

    def adjunct(self, kind: str) -> _Adjunct:
        rng = self.rng
        if kind == "t":
            text = rng.choice(_TIMES).replace("{ORD}", rng.choice(_ORDINALS))
            text = text.replace("{PERIOD}", rng.choice(_PERIODS))
            return _Adjunct(text, text, "When")
        if kind == "p":
            text = f"{rng.choice(_PREPOSITIONS)} {self.fill_names(rng.choice(_LOCATIONS))}"
            return _Adjunct(text, text, "Where")
        if kind == "m":
            text = rng.choice(_MANNERS)
            return _Adjunct(text, text, "How")
        instrument = rng.choice(_INSTRUMENTS)
        return _Adjunct(f"with {instrument}", instrument, "With what")

    def subject(self, category: str) -> _Subject:
        plural_kinds, singular_kinds = _KINDS[category]
        core = self.invent()
        if singular_kinds and (not plural_kinds or self.rng.random() < 0.35):
            kind = self.rng.choice(singular_kinds)
            of_form = category in ("group", "event") and self.rng.random() < 0.4
            return _Subject(f"{kind} of {core}" if of_form else f"{core} {kind}", False, category)
        return _Subject(f"{core} {self.rng.choice(plural_kinds)}", True, category)

    def fact(self, used_subjects: set[str]) -> _Fact:
        categories = list(_CATEGORY_WEIGHTS)
        category = self.rng.choices(categories, weights=[_CATEGORY_WEIGHTS[c] for c in categories])[0]
        for _ in range(_MAX_ATTEMPTS):
            subject = self.subject(category)
            if subject.name not in used_subjects:
                break
        else:
            raise RuntimeError(f"could not find an unused {category} name in {_MAX_ATTEMPTS} attempts")
        frames = [frame for frame, weight, cats in _FRAMES if category in cats for _ in range(weight)]
        context, options = self.rng.choice(frames)(self, subject)
        # Subject answers are down-weighted so that most answers sit mid-sentence or at the end.
        weights = [_SUBJECT_ANSWER_WEIGHT if answer == subject.name else 1.0 for _, answer in options]
        question, answer = self.rng.choices(options, weights=weights)[0]
        return _Fact(context, question, answer, subject.name)


def _pick_adjunct(w: _Writer, allowed: str, *, p_none: float) -> _Adjunct | None:
    if not allowed or w.rng.random() < p_none:
        return None
    return w.adjunct(w.rng.choice(allowed))


def _clause(s: _Subject, verb: _Verb, obj: str, adjunct: _Adjunct | None, *, front: bool) -> str:
    if adjunct is not None and front:
        return f"{_cap(adjunct.text)}, {s.np} {verb.finite(s)} {obj}."
    tail = f" {adjunct.text}" if adjunct is not None else ""
    return f"{_cap(s.np)} {verb.finite(s)} {obj}{tail}."


def _frame_transitive(w: _Writer, s: _Subject) -> tuple[str, list[tuple[str, str]]]:
    """S verb O [adjunct]: the answer is the subject, the object or the adjunct."""
    phrase, pool_name, allowed, passive = w.rng.choice(_TRANSITIVE[s.category])
    verb = _Verb(phrase, passive)
    obj = w.phrase(pool_name)
    adjunct = _pick_adjunct(w, allowed, p_none=0.35)
    front = adjunct is not None and adjunct.wh in ("When", "Where") and w.rng.random() < 0.35
    context = _clause(s, verb, obj, adjunct, front=front)
    keep = f" {adjunct.text}" if adjunct is not None and w.rng.random() < 0.4 else ""
    options = [
        (verb.ask(_POOLS[pool_name].wh, s, keep), obj),
        (verb.ask_subject(s.wh, s, f" {obj}{keep}"), s.name),
    ]
    if adjunct is not None:
        answer = _cap(adjunct.answer) if front else adjunct.answer
        options.append((verb.ask(adjunct.wh, s, f" {obj}"), answer))
    return context, options


def _frame_intransitive(w: _Writer, s: _Subject) -> tuple[str, list[tuple[str, str]]]:
    """S verb [place] [time]: the answer is the subject, the place or the time."""
    phrase, passive = w.rng.choice(_INTRANSITIVE[s.category])
    verb = _Verb(phrase, passive)
    adjuncts = [w.adjunct("t"), w.adjunct("p")]
    if w.rng.random() < 0.5:
        adjuncts.reverse()
    if w.rng.random() < 0.4:
        adjuncts.pop(w.rng.randrange(2))
    if len(adjuncts) == 2 and w.rng.random() < 0.3:
        context = f"{_cap(adjuncts[0].text)}, {s.np} {verb.finite(s)} {adjuncts[1].text}."
        answers = [_cap(adjuncts[0].answer), adjuncts[1].answer]
    else:
        context = f"{_cap(s.np)} {verb.finite(s)} {' '.join(a.text for a in adjuncts)}."
        answers = [a.answer for a in adjuncts]
    options = [(verb.ask_subject(s.wh, s, "".join(f" {a.text}" for a in adjuncts)), s.name)]
    for i, adjunct in enumerate(adjuncts):
        others = "".join(f" {a.text}" for j, a in enumerate(adjuncts) if j != i)
        options.append((verb.ask(adjunct.wh, s, others), answers[i]))
    return context, options


def _frame_relative(w: _Writer, s: _Subject) -> tuple[str, list[tuple[str, str]]]:
    """S, who/which verb1 O1, verb2 O2: two object answers, one mid-sentence and one at the end."""
    first, second = w.rng.sample(_TRANSITIVE[s.category], 2)
    verbs = [_Verb(first[0], first[3]), _Verb(second[0], second[3])]
    objs = [w.phrase(first[1]), w.phrase(second[1])]
    context = f"{_cap(s.np)}, {s.rel} {verbs[0].finite(s)} {objs[0]}, {verbs[1].finite(s)} {objs[1]}."
    options = [
        (verbs[0].ask(_POOLS[first[1]].wh, s), objs[0]),
        (verbs[1].ask(_POOLS[second[1]].wh, s), objs[1]),
        (verbs[1].ask_subject(s.wh, s, f" {objs[1]}"), s.name),
    ]
    return context, options


def _frame_colour(w: _Writer, s: _Subject) -> tuple[str, list[tuple[str, str]]]:
    """The colour of a part of S, stated in one of three word orders."""
    part = w.rng.choice(_PARTS[s.category])
    colour = w.rng.choice(_COLOURS)
    if w.rng.random() < 0.5:
        colour = f"{w.rng.choice(_SHADES)} {colour}"
    style = w.rng.randrange(3)
    if style == 0:
        context = f"The {part} of {s.np} are {colour}."
    elif style == 1:
        context = f"{_cap(s.np)} {s.verb('have')} {colour} {part}."
    else:
        context = f"{_cap(s.np)} {s.verb('have')} {part} of {colour}."
    options = [(f"What colour are the {part} of {s.np}?", colour)]
    if style != 0:
        owned = f"{colour} {part}" if style == 1 else f"{part} of {colour}"
        options.append((f"{s.wh} has {owned}?", s.name))
    return context, options


def _frame_count(w: _Writer, s: _Subject) -> tuple[str, list[tuple[str, str]]]:
    """S has N units: the answer is the number, or the subject."""
    phrase, unit, small = w.rng.choice(_COUNTS[s.category])
    number = w.number(small=small)
    context = f"{_cap(s.np)} {s.verb(phrase)} {number} {unit}."
    options = [
        (f"How many {unit} {s.do} {s.np} {phrase}?", number),
        (f"{s.wh} {_third_person(phrase)} {number} {unit}?", s.name),
    ]
    return context, options


def _frame_origin(w: _Writer, s: _Subject) -> tuple[str, list[tuple[str, str]]]:
    """S was founded/built/made by a person [in a year]: who, when, or what."""
    participle = w.rng.choice(_FOUNDING[s.category])
    person = w.fill_names(w.rng.choice(_PERSONS))
    when = f"in the year {w.rng.randrange(200, 1900)}" if w.rng.random() < 0.5 else ""
    tail = f" {when}" if when else ""
    context = f"{_cap(s.np)} {s.was} {participle} by {person}{tail}."
    options = [
        (f"Who {participle} {s.np}?", person),
        (f"What was {participle} by {person}?", s.name),
    ]
    if when:
        options.append((f"When {s.was} {s.np} {participle}?", when))
    return context, options


def _frame_duration(w: _Writer, s: _Subject) -> tuple[str, list[tuple[str, str]]]:
    """An event lasts a while: the answer is the duration."""
    if w.rng.random() < 0.25:
        duration = w.rng.choice(_DURATIONS_FIXED)
    else:
        duration = f"{w.number()} {w.rng.choice(_DURATION_UNITS)}"
    adjunct = w.adjunct("p") if w.rng.random() < 0.4 else None
    tail = f" {adjunct.text}" if adjunct is not None else ""
    context = f"{_cap(s.np)} {s.verb('last')} {duration}{tail}."
    options = [(f"How long {s.do} {s.np} last?", duration)]
    if adjunct is not None:
        options.append((f"Where {s.be} {s.np} held?", adjunct.answer))
    return context, options


def _frame_dwelling(w: _Writer, s: _Subject) -> tuple[str, list[tuple[str, str]]]:
    """Inverted location ("Beneath X live the Y"): the subject ends the sentence, the place starts it."""
    verb = w.rng.choice(_DWELLING[s.category])
    place = w.adjunct("p")
    context = f"{_cap(place.text)} {s.verb(verb)} {s.np}."
    options = [
        (f"{s.wh} {_third_person(verb)} {place.text}?", s.name),
        (f"Where {s.do} {s.np} {verb}?", _cap(place.answer)),
    ]
    return context, options


# (frame, weight, categories it applies to)
_FRAMES: tuple[tuple[_Frame, int, tuple[str, ...]], ...] = (
    (_frame_transitive, 6, ("group", "creature", "object", "place", "event")),
    (_frame_intransitive, 3, ("group", "creature", "object", "place", "event")),
    (_frame_relative, 2, ("group", "creature", "object", "place", "event")),
    (_frame_colour, 2, ("group", "creature", "object", "place", "event")),
    (_frame_count, 2, ("group", "creature", "object", "place", "event")),
    (_frame_origin, 1, ("group", "creature", "object", "place", "event")),
    (_frame_duration, 4, ("event",)),
    (_frame_dwelling, 2, ("group", "creature", "object", "place")),
)

FIXED_VOCABULARY: frozenset[str] = _vocabulary_words()
"""Lower-cased words of the templates and vocabulary tables; any other word in a context is invented."""


def invented_words(text: str) -> set[str]:
    """The invented names in ``text``: letter runs that are not vocabulary words."""
    return {w for w in _LETTERS.findall(text) if w.lower() not in FIXED_VOCABULARY}


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


def _spec_texts(context: str, question: str, irrelevant_question: str) -> list[tuple[str, str, int]]:
    """The three SPEC §3 texts as (name, text, offset of the context inside the text)."""
    return [
        ("neutral", f"Context: {context} ", len("Context: ")),
        ("positive", f"Question: {question}\nContext: {context}", len(f"Question: {question}\nContext: ")),
        (
            "negative",
            f"Question: {irrelevant_question}\nContext: {context}",
            len(f"Question: {irrelevant_question}\nContext: "),
        ),
    ]


def _inside_word(text: str, start: int, end: int) -> bool:
    """Whether the span [start, end) cuts into a longer word on either side."""
    before = start > 0 and text[start - 1].isalnum() and text[start].isalnum()
    after = end < len(text) and text[end].isalnum() and text[end - 1].isalnum()
    return before or after


def validate_pair(pair: Mapping[str, object]) -> list[str]:
    """The problems that would make ``pair`` unusable for building projections; empty when it is valid.

    Beyond well-formed fields, checks what the builder relies on: it takes the first case-insensitive
    occurrence of the answer in each SPEC §3 text, so that occurrence must be a whole-word span of the
    context, and neither the relevant nor the irrelevant question may contain the answer.
    """
    problems: list[str] = [f"missing field {key!r}" for key in FIELDS if key not in pair]
    if "id" in pair:
        ident = pair["id"]
        is_int = isinstance(ident, int) and not isinstance(ident, bool)
        if not (is_int or (isinstance(ident, str) and ident.strip())):
            problems.append(f"field 'id' must be an int or a non-empty string, got {ident!r}")
    for key in FIELDS[1:]:
        if key not in pair:
            continue
        value = pair[key]
        if not isinstance(value, str) or not value.strip():
            problems.append(f"field {key!r} must be a non-empty string, got {value!r}")
        elif value != value.strip():
            problems.append(f"field {key!r} has leading or trailing whitespace; strip it")
    if problems:
        return problems
    if str(pair["context_1"]).lower() == str(pair["context_2"]).lower():
        problems.append("context_1 and context_2 are identical; a pair needs two unrelated contexts")
    for i, j in ((1, 2), (2, 1)):
        answer, context = str(pair[f"answer_{i}"]), str(pair[f"context_{i}"])
        question, irrelevant = str(pair[f"question_{i}"]), str(pair[f"question_{j}"])
        needle = answer.lower()
        start = context.lower().find(needle)
        if start < 0:
            problems.append(f"answer_{i} {answer!r} is not a span of context_{i} (case-insensitive)")
            continue
        if _inside_word(context, start, start + len(answer)):
            problems.append(
                f"answer_{i} {answer!r} first occurs inside a longer word of context_{i}; "
                "the builder would highlight part of that word"
            )
        in_question = needle in question.lower()
        in_irrelevant = needle in irrelevant.lower()
        if in_question:
            problems.append(f"answer_{i} {answer!r} appears in question_{i}; the question gives it away")
        if in_irrelevant:
            problems.append(
                f"answer_{i} {answer!r} appears in question_{j}, the irrelevant question of its negative text"
            )
        for name, text, offset in _spec_texts(context, question, irrelevant):
            if (name == "positive" and in_question) or (name == "negative" and in_irrelevant):
                continue
            if text.lower().find(needle) < offset:
                problems.append(
                    f"answer_{i} {answer!r} first occurs outside the context in the {name} text {text!r}; "
                    "the builder takes the first occurrence"
                )
    return problems


def validate_file(path: str | Path, *, raise_errors: bool = True) -> list[str]:
    """Validate every line of a JSON-lines pair file (and that ids are unique); return the problems.

    Raises ``ValueError`` listing them when there are any and ``raise_errors`` is true.
    """
    path = Path(path)
    problems: list[str] = []
    first_line_of: dict[object, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                pair = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"line {number}: not valid JSON ({error.msg})")
                continue
            if not isinstance(pair, dict):
                problems.append(f"line {number}: expected a JSON object, got {type(pair).__name__}")
                continue
            problems += [f"line {number}: {problem}" for problem in validate_pair(pair)]
            ident = pair.get("id")
            if isinstance(ident, int | str):
                if ident in first_line_of:
                    problems.append(f"line {number}: duplicate id {ident!r} (first on line {first_line_of[ident]})")
                else:
                    first_line_of[ident] = number
    if problems and raise_errors:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{path}: {len(problems)} problem(s) in synthetic QA pairs:\n  {shown}{more}")
    return problems


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


def _usable(pair: Pair, contexts: set[str]) -> bool:
    """Valid, each answer a single occurrence in its context, and both contexts new to the file."""
    if validate_pair(pair):
        return False
    for i in (1, 2):
        context = str(pair[f"context_{i}"])
        if context in contexts or context.lower().count(str(pair[f"answer_{i}"]).lower()) != 1:
            return False
    return True


def generate_pairs(n: int, *, seed: int = 0, split: Split = "train") -> list[Pair]:
    """``n`` distinct, valid synthetic QA pairs with ids ``1..n``, deterministic in (``seed``, ``split``).

    Pairs are drawn one after another from ``random.Random(seed)``, so a shorter run is a prefix of a longer
    one. Every entity name and context occurs once per file; invented words all belong to ``split``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    writer = _Writer(Random(seed), split)
    pairs: list[Pair] = []
    subjects: set[str] = set()
    contexts: set[str] = set()
    while len(pairs) < n:
        for _ in range(_MAX_ATTEMPTS):
            first = writer.fact(subjects)
            second = writer.fact(subjects | {first.subject})
            pair: Pair = {
                "id": len(pairs) + 1,
                "context_1": first.context,
                "question_1": first.question,
                "answer_1": first.answer,
                "context_2": second.context,
                "question_2": second.question,
                "answer_2": second.answer,
            }
            if _usable(pair, contexts):
                break
        else:
            raise RuntimeError(f"could not draw a valid pair in {_MAX_ATTEMPTS} attempts (pair {len(pairs) + 1})")
        pairs.append(pair)
        subjects |= {first.subject, second.subject}
        contexts |= {first.context, second.context}
    return pairs


def write_pairs(pairs: Iterable[Mapping[str, object]], path: str | Path) -> Path:
    """Write pairs as JSON lines (UTF-8, field order of ``FIELDS``) atomically: temp file + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({key: pair[key] for key in FIELDS}, ensure_ascii=False) + "\n" for pair in pairs]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="\n") as handle:
            handle.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_pairs(path: str | Path) -> list[Pair]:
    """Read a JSON-lines pair file (no validation; see ``validate_file``)."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    """Lower-cased word tokens: runs of letters/digits, joined across inner hyphens and apostrophes."""
    return [w.lower() for w in _WORD.findall(text)]


def _summary(prefix: str, values: Sequence[float]) -> dict[str, float]:
    return {f"{prefix}_mean": statistics.fmean(values), f"{prefix}_min": min(values), f"{prefix}_max": max(values)}


def corpus_statistics(pairs: Sequence[Mapping[str, object]]) -> dict[str, float]:
    """Descriptive statistics of a pair corpus, over its 2·len(pairs) (context, question, answer) items.

    Lengths are in words (``_words``) and characters. The answer offset is the start of the first
    case-insensitive occurrence of the answer in its context divided by the context length (items whose
    answer is not in the context are left out of the offset statistics). Vocabulary and type-token ratio
    count the word tokens of all contexts and questions. Overlap is the share of the answer's distinct
    words that also occur in its question, averaged over items; the content variant ignores stop words.
    """
    if not pairs:
        raise ValueError("pairs is empty; corpus_statistics needs at least one pair")
    items = [
        (str(pair[f"context_{i}"]), str(pair[f"question_{i}"]), str(pair[f"answer_{i}"]))
        for pair in pairs
        for i in (1, 2)
    ]
    offsets: list[float] = []
    ends_context = 0
    overlap: list[float] = []
    content_overlap: list[float] = []
    any_overlap = 0
    answer_in_question = 0
    tokens: list[str] = []
    for context, question, answer in items:
        tokens += _words(context) + _words(question)
        start = context.lower().find(answer.lower())
        if start >= 0:
            offsets.append(start / len(context))
            ends_context += not context[start + len(answer) :].strip(" .!?")
        answer_words, question_words = set(_words(answer)), set(_words(question))
        shared = answer_words & question_words
        overlap.append(len(shared) / len(answer_words) if answer_words else 0.0)
        content = answer_words - _STOPWORDS
        content_overlap.append(len(content & question_words) / len(content) if content else 0.0)
        any_overlap += bool(shared)
        answer_in_question += answer.lower() in question.lower()
    n_items = len(items)
    stats: dict[str, float] = {"pairs": len(pairs), "items": n_items}
    stats |= _summary("context_words", [len(_words(c)) for c, _, _ in items])
    stats |= _summary("context_chars", [len(c) for c, _, _ in items])
    stats |= _summary("question_words", [len(_words(q)) for _, q, _ in items])
    stats |= _summary("answer_words", [len(_words(a)) for _, _, a in items])
    stats |= _summary("answer_chars", [len(a) for _, _, a in items])
    stats["answer_found_share"] = len(offsets) / n_items
    stats["answer_offset_mean"] = statistics.fmean(offsets) if offsets else float("nan")
    stats["answer_offset_first_third_share"] = sum(o < 1 / 3 for o in offsets) / n_items
    stats["answer_offset_middle_third_share"] = sum(1 / 3 <= o < 2 / 3 for o in offsets) / n_items
    stats["answer_offset_last_third_share"] = sum(o >= 2 / 3 for o in offsets) / n_items
    stats["answer_ends_context_share"] = ends_context / n_items
    stats["tokens"] = len(tokens)
    stats["vocabulary_size"] = len(set(tokens))
    stats["type_token_ratio"] = len(set(tokens)) / len(tokens)
    stats["answer_question_overlap_mean"] = statistics.fmean(overlap)
    stats["answer_question_content_overlap_mean"] = statistics.fmean(content_overlap)
    stats["answer_question_any_overlap_share"] = any_overlap / n_items
    stats["answer_in_question_share"] = answer_in_question / n_items
    return stats


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def generate(
    *, n: int = 2000, seed: int = 0, split: Split = "train", out: Path = Path("data/synthetic_qa.jsonl")
) -> Path:
    """Generate synthetic QA pairs for building SEKA projections and write them as JSON lines.

    Args:
        n: Number of pairs; each pair yields two builder triplets.
        seed: Seed of ``random.Random``; the same seed, n and split give a byte-identical file.
        split: Partition the invented names come from ("train" or "heldout"); files of different splits
            share no entity name, so a heldout file is a clean validation set.
        out: Output JSON-lines path, written atomically.
    """
    pairs = generate_pairs(n, seed=seed, split=split)
    path = write_pairs(pairs, out)
    log.info("wrote %d %s pairs (seed %d) to %s", len(pairs), split, seed, path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (``python -m seka_lightning.data.generator --help``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    CLI(generate, args=None if argv is None else list(argv), as_positional=False)


if __name__ == "__main__":
    main()
