"""The built-in corpus's vocabulary: word and name lists, phrase templates, word helpers.

Everything here is plain data or a pure function of its arguments; which words are common
is decided per seed in ``world.py``, and ``genres.py`` fills the templates.
"""

from __future__ import annotations


def _words(text: str) -> list[str]:
    return text.split()


_NOUNS = _words(
    """
lantern basket bridge letter key window door kettle garden road boat wagon rope hill field
orchard well stone coin map book candle cloak boot hammer loaf apple pear net oar barrel bell
clock ladder fence gate mill market tower chapel inn harbour cart horse goat dog cat crow owl
fox sheep hen lamp shelf chair table cup bowl jar knife spoon scarf hat ribbon feather shell
pebble branch leaf root seed flower meadow forest path valley island cliff shore storm cloud
wind fire song story secret promise journey festival wedding harvest winter summer morning
evening letterbox blanket window-box staircase cellar attic chimney roof courtyard square
fountain statue workshop kitchen pantry cottage barn stable granary quay lighthouse ferry
compass needle thread button mirror whistle drum fiddle puzzle riddle coat glove pocket purse
wheel saddle bucket broom spade sack parcel ticket
"""
)

_IRREGULAR_PLURALS = {
    "loaf": "loaves",
    "knife": "knives",
    "leaf": "leaves",
    "shelf": "shelves",
    "sheep": "sheep",
    "fish": "fish",
    "wolf": "wolves",
    "child": "children",
}

_ADJECTIVES = _words(
    """
old small quiet bright heavy narrow broken golden cold warm dark green red tall strange careful
hungry tired brave gentle crooked empty wet dusty silver wooden little long steep distant
sudden patient clever lonely noisy soft rough sweet bitter hidden open grey pale yellow blue
young ancient famous humble proud curious stubborn faithful restless muddy frozen cheerful
worn shiny secret simple polished painted lucky unlucky sleepy busy idle salty fragrant
crumbling sturdy ragged gleaming hollow round
"""
)

_ADVERBS = _words(
    """
slowly quickly quietly carefully suddenly gladly softly loudly often rarely patiently
anxiously happily sadly again eagerly gently bravely early late silently warmly firmly
cheerfully nervously proudly calmly wearily briskly
"""
)

# (base, past, past participle)
_TRANSITIVE = [
    tuple(v.split("/"))
    for v in _words(
        """
carry/carried/carried find/found/found open/opened/opened mend/mended/mended
paint/painted/painted lift/lifted/lifted drop/dropped/dropped sell/sold/sold buy/bought/bought
build/built/built clean/cleaned/cleaned follow/followed/followed watch/watched/watched
hide/hid/hidden fill/filled/filled bring/brought/brought carve/carved/carved
count/counted/counted gather/gathered/gathered pull/pulled/pulled push/pushed/pushed
wrap/wrapped/wrapped fix/fixed/fixed borrow/borrowed/borrowed lend/lent/lent
share/shared/shared steal/stole/stolen catch/caught/caught throw/threw/thrown keep/kept/kept
lose/lost/lost visit/visited/visited cross/crossed/crossed polish/polished/polished
sweep/swept/swept sharpen/sharpened/sharpened tie/tied/tied load/loaded/loaded
weigh/weighed/weighed measure/measured/measured guard/guarded/guarded feed/fed/fed
forget/forgot/forgotten remember/remembered/remembered drag/dragged/dragged
"""
    )
]

_INTRANSITIVE = [
    tuple(v.split("/"))
    for v in _words(
        """
walk/walked/walked wait/waited/waited laugh/laughed/laughed sing/sang/sung run/ran/run
sleep/slept/slept listen/listened/listened rest/rested/rested smile/smiled/smiled
whisper/whispered/whispered hurry/hurried/hurried wander/wandered/wandered sit/sat/sat
stand/stood/stood return/returned/returned shout/shouted/shouted sigh/sighed/sighed
hesitate/hesitated/hesitated arrive/arrived/arrived leave/left/left worry/worried/worried
dance/danced/danced climb/climbed/climbed work/worked/worked fall/fell/fallen
settle/settled/settled linger/lingered/lingered
"""
    )
]

_PREPOSITIONS = _words(
    """
near behind under beside across beyond above inside along past toward around through
"""
)

_TIMES = [
    "dawn",
    "noon",
    "dusk",
    "midnight",
    "the next morning",
    "the end of the week",
    "the first frost",
    "supper",
    "the market day",
    "the evening bell",
]
_TIMES_AGO = [
    "last winter",
    "long ago",
    "the day before",
    "years ago",
    "that morning",
    "in the spring",
    "before the flood",
    "at the last harvest",
]
_WEATHER = ["rain", "fog", "snow", "frost", "wind", "mist", "hail", "sunshine"]

# (trade, product, product plural, tool, workplace)
_TRADES = [
    ("baker", "loaf", "loaves", "oven", "bakery"),
    ("smith", "horseshoe", "horseshoes", "anvil", "forge"),
    ("weaver", "blanket", "blankets", "loom", "weaving shed"),
    ("potter", "jug", "jugs", "wheel", "pottery"),
    ("cooper", "barrel", "barrels", "adze", "cooperage"),
    ("carpenter", "chair", "chairs", "plane", "workshop"),
    ("fisher", "basket of fish", "baskets of fish", "net", "boat"),
    ("miller", "sack of flour", "sacks of flour", "millstone", "mill"),
    ("tailor", "coat", "coats", "needle", "shop"),
    ("cobbler", "boot", "boots", "awl", "stall"),
    ("chandler", "candle", "candles", "mould", "shop"),
    ("brewer", "cask", "casks", "kettle", "brewhouse"),
    ("beekeeper", "jar of honey", "jars of honey", "smoker", "apiary"),
    ("glassblower", "bottle", "bottles", "blowpipe", "glasshouse"),
    ("bookbinder", "book", "books", "bone folder", "bindery"),
    ("ropemaker", "coil of rope", "coils of rope", "twisting wheel", "ropewalk"),
    ("clockmaker", "clock", "clocks", "loupe", "workshop"),
    ("mason", "gravestone", "gravestones", "chisel", "yard"),
    ("boatwright", "boat", "boats", "caulking iron", "boatyard"),
    ("herbalist", "remedy", "remedies", "mortar", "garden"),
    ("cheesemaker", "wheel of cheese", "wheels of cheese", "press", "dairy"),
    ("scribe", "letter", "letters", "quill", "study"),
    ("mapmaker", "map", "maps", "compass", "study"),
    ("basketmaker", "basket", "baskets", "knife", "shed"),
    ("saddler", "saddle", "saddles", "awl", "saddlery"),
    ("locksmith", "lock", "locks", "file", "shop"),
    ("jeweller", "ring", "rings", "loupe", "shop"),
    ("gardener", "bunch of flowers", "bunches of flowers", "spade", "garden"),
    ("ironmonger", "kettle", "kettles", "hammer", "shop"),
    ("dyer", "bolt of cloth", "bolts of cloth", "vat", "dyehouse"),
]

_FIRST_NAMES_F = _words(
    """
Mara Elin Ida Nell Ada Rosa Lena Vera Iris Greta Nora Clara Agnes Edda Hedda Wren Maud Elise
Tilde Freya Liesl Dagny Ottilie Runa Tessa Yara Élise Inés Zoë Renée Anaïs Chloé Dörte Åsa
Märta Amélie Sigrid Hanne Lotte Beatrix Imke Solveig
"""
)
_FIRST_NAMES_M = _words(
    """
Tomas Oskar Hugo Bram Felix Jonas Anton Emil Otto Leon Pim Silas Tobias Rufus Milo Cyril Lars
Jasper Aurel Osric Corin Ewan Piet Sander Ulric Ansel Jürgen Søren Björn Øyvind José Noël
René Jörg Håkon Anders Matthias Kasimir Edwin Alaric
"""
)
_SURNAME_HEADS = _words(
    """
Quill Harrow Fair Black Thorn Mill Ash Oak Crane Hollow Stone Brook Wren Marsh Gale Pike Rowan
Tull Vane Kettle Amber Birch Cobb Dale Fen Hart Lark Moss Reed Sorrel
"""
)
_SURNAME_TAILS = ["", "wood", "well", "by", "ley", "more", "ridge", "field", "worth", "er"]
_SURNAMES_EXTRA = _words(
    """
Østergaard Bélanger Müller Grönberg Dvořák Nuñez Lefèvre Kovač Åberg Søndergaard Brønn Jäger
"""
)
_TOWN_HEADS = _words(
    """
Dun Ash Keld Bram Hol Wen Mar Thorn Elm Fen Grey Stan Rook Lin Ost Car Bel Wick Tor Har Mor
Sel Brin Cal Ald Yar Pen Lud Kirk Nor Lø Brü Sé
"""
)
_TOWN_TAILS = _words(
    """
mere ford wick holm by stead ton dale wold haven moor bridge field gate minster thorpe ley combe
"""
)
_RIVER_HEADS = _words(
    """
Ash Tam Wen Yare Lune Ouse Esk Dove Avon Tees Kenn Bly Swale Roth Coln Nene Wye Brue Frome Isel
Leven Cray Ure
"""
)
_RIVER_TAILS = ["well", "burn", "water", "brook", "ey", "en", "rill", ""]
_REGIONS = _words(
    """
Westmark Oakshire Eastvale Mossland Fernhollow Brackenshire Saltmarsh Highfold Lowmere Redcliffe
"""
)
_HILLS = _words(
    """
Cairn Grey Heather Raven Blue Iron Sheep Wether Thistle Lantern Crow
"""
)
_SEAS = [
    "the Grey Sea",
    "the Amber Sea",
    "Lake Orrin",
    "the Narrow Sea",
    "Lake Vell",
    "the Northern Bay",
]

_TOWN_EVENTS = [
    "a great fire destroyed the {n} near the market",
    "the old stone bridge over the {river} was built",
    "a {adj} flood covered the lower streets",
    "the first fair was held on the green",
    "the town hall was rebuilt after a storm",
    "a school for young {trade}s was opened",
    "the harbour wall was extended by a hundred paces",
    "a {adj} winter froze the {river} for six weeks",
]

_EXOTIC = [
    "On the lid of the box someone had written 山川, and nobody in {town} could read it.",
    "The sign above the door showed a little drawing and the words 旅の宿.",
    "{name} ended the note with a small 🙂.",
    "A traveller had left a card that read 河 — which, {pron} was told, means river.",
    "Beside the price, someone had drawn a tiny 🍞.",
    "The postcard from the far east said only 你好 and was signed with a 🌧️.",
]

_RECIPE_INGREDIENTS = _words(
    """
flour butter sugar salt eggs milk honey apples pears onions carrots barley oats cheese cream
thyme parsley leeks potatoes beans raisins walnuts cinnamon pepper
"""
)
_UNITS = ["cup", "spoon", "handful", "pinch", "pound", "jug"]
_DISHES = _words(
    """
pie stew bread soup cake pudding tart porridge broth pancakes dumplings
"""
)
_COOK_VERBS = _words(
    """
stir mix chop fold bake boil simmer roast knead slice warm cool
"""
)

_ONES = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
)
_TENS = _words("_ _ twenty thirty forty fifty sixty seventy eighty ninety")


def number_words(n: int) -> str:
    """English words for 0 <= n < 1_000_000 ("forty-two", "three hundred and five")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" and {number_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    head = f"{number_words(thousands)} thousand"
    if not rest:
        return head
    return head + (" and " if rest < 100 else " ") + number_words(rest)


def plural(noun: str) -> str:
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def article(word: str) -> str:
    return ("an " if word[0] in "aeiouAEIOU" else "a ") + word


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# ------------------------------------------------------------------------ phrase templates
# {slot}s are filled by writer._Slots: fixed values, else a fresh draw from the world.

_STORY_SENTENCES = [
    "{S} {vt} the {adj} {n} {prep} the {n2}.",
    "{adv}, {S} {vi}.",
    "{S} {vi} {adv} {prep} the {n}.",
    "when {S} {vt} the {n}, {S2} {vi} {adv}.",
    "the {n} was {adj}, and the {n2} was {adj2}.",
    "{hero} did not {vt_base} the {n}; {P} {vt} the {n2} instead.",
    "because the {n} was so {adj}, {S} {vi} until {time}.",
    "{hero} thought about the {n} that {P} had {vt_pp} {time_ago}.",
    "by {time} the {weather} had settled over {town}.",
    "{S} {vt} {num} {ns} and {vi2} {adv}.",
    "there was {a_adj} {n} {prep} the {n2}, and nobody knew why.",
    "{S} {vt} the {n}, then {vt2} the {n2}.",
    "it was {a_adj} {time_word} in {town}.",
    "{S} {vi} {prep} the {n} while the {weather} {weather_verb}.",
    "the {adj} {n} {vi} {prep} the {n2}.",
    "{S} had never {vt_pp} {a_adj} {n} before.",
    "for a long time {hero} {vi}, and then {P} {vt} the {n}.",
]
_DASH_SENTENCES = [
    "{S} {vi}—{adv}—and then {S2} {vt} the {n}.",
    "the {n}—{a_adj} one, {adj2} and {adj}—lay {prep} the {n2}.",
    "{S} {vt} the {n} — not the {n2}, as everyone had expected.",
]
_SAYINGS = [
    "where is the {adj} {n}",
    "have you seen the {n}",
    "we should {vi_base} before {time}",
    "the {n} is {adj} today",
    "I {vt} the {n} {time_ago}",
    "bring me the {n}, please",
    "do not {vt_base} the {n2}",
    "it is too {adj} to {vi_base}",
    "the {weather} will come before {time}",
    "I never liked that {adj} {n}",
    "you were right about the {n}",
]
_SPEECH_VERBS = ["said", "asked", "whispered", "called", "replied", "muttered", "laughed"]
