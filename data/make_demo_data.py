#!/usr/bin/env python3
"""Write the deterministic demo dataset: enriched SFT records with realistic dirt.

    python3 data/make_demo_data.py                                   # data/demo_enriched.jsonl
    python3 data/make_demo_data.py --seed 7 --n 5000 --output /tmp/demo.jsonl
    python3 data/make_demo_data.py --clean --n 100000 --output /tmp/bench.jsonl   # no dirt

Five task categories whose answers can be checked exactly and that a 135M model learns with LoRA
in well under 100 CPU steps (short prompts, answers of a few to ~25 tokens):

- ``classification``: route a customer message to billing / shipping / technical / account
- ``sentiment``: a product review is positive / negative / neutral
- ``extraction``: an order message to JSON ``{"product", "quantity", "city"}``
- ``date_format``: the date in a sentence rewritten as YYYY-MM-DD
- ``qa``: a short answer copied from a short passage (some passages carry two questions)

About 15% of the clean records are multi-turn conversations: the category's task as the first
exchange, then one or two follow-up questions about the same message, review, order, date or
passage, answered just as exactly and briefly (classification: which team handles that route, a
fixed name per route, or the order number the message mentions; sentiment: the product reviewed,
or whether the quality team should follow it up; extraction: the city, quantity or product;
date_format: the month, or the date as DD/MM/YYYY; qa: another question about the
passage). Two or three exchanges each, about 30% after a system turn; two thirds OpenAI shaped
(``messages``: role/content), one third ShareGPT (``conversations``: from human/gpt/system,
value). They have their own random stream: ``clean_records`` is unchanged, the single-turn
records are its first ones (fewer than before, as ``--n`` counts all lines), and the
conversations are shuffled in among them with the rest.

Every record has enrichment fields (id, source, quality_score, tags, created_at, category). Most
single-turn records use the instruction/context/response shape; a few are alpaca
(instruction/input/output), one-exchange chat (``messages``) or prompt/completion shaped, as after
merging exports. The dirt (about 5% of the lines, all caught by the prep stage): exact and near
duplicates (one exact copy is a conversation), empty / null / missing / wrong-typed responses,
e-mail addresses, phone numbers and API keys (a few in conversations), one overlong record,
truncated and malformed JSON lines, a line that is not UTF-8, blank lines, stray control and
zero-width characters, non-NFC accents, and three broken conversations: one ending on a user turn,
one with two assistant turns in a row, one with an empty assistant turn.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import unicodedata
from pathlib import Path
from typing import Any, Callable, Iterator

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "demo_enriched.jsonl"
CATEGORY_WEIGHTS = {"classification": 0.24, "sentiment": 0.18, "extraction": 0.22,
                    "date_format": 0.18, "qa": 0.18}

FIRST_NAMES = ["Ada", "Bruno", "Chiara", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
               "Kemal", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara",
               "Umar", "Vera", "Wes", "Yara", "Zoe"]
LAST_NAMES = ["Abara", "Berg", "Costa", "Dubois", "Eriksen", "Fontaine", "Garcia", "Haddad",
              "Ivanova", "Jensen", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov",
              "Quispe", "Rossi", "Sato", "Tanaka", "Ueda", "Vargas", "Weber", "Xu", "Yilmaz"]
CITIES = ["Lyon", "Porto", "Leeds", "Graz", "Ghent", "Malmo", "Turin", "Bergen", "Cork", "Basel",
          "Utrecht", "Krakow", "Seville", "Tampere", "Aarhus", "Bilbao", "Dresden", "Nantes",
          "Split", "Brno", "Riga", "Tartu", "Lille", "Genoa", "Kassel", "Pilsen", "Zadar", "Oulu"]
PRODUCTS = ["green tea", "espresso beans", "desk lamp", "yoga mat", "water bottle", "notebook",
            "phone case", "wool scarf", "bike light", "coffee grinder", "plant pot", "backpack",
            "travel mug", "usb cable", "wall clock", "cutting board", "hand cream", "umbrella",
            "sketchbook", "bird feeder", "candle set", "rain jacket", "chess set", "tea kettle",
            "reading glasses", "shoe rack", "pillow cover", "headphones", "picture frame"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]

TICKET_TEMPLATES = {
    "billing": [
        "I was charged twice for order #{order} and would like one payment refunded.",
        "My invoice {inv} shows {amount} euros but the price on your site was lower.",
        "Can you explain the extra fee of {amount} euros on my last statement?",
        "The refund for order #{order} has still not reached my card after {days} days.",
        "Please update the VAT number on invoice {inv}, the current one is wrong.",
        "Why did my subscription renew at {amount} euros instead of the promised discount?",
    ],
    "shipping": [
        "My package for order #{order} has been stuck in {city} for {days} days.",
        "The courier left order #{order} at the wrong address in {city}.",
        "Can I change the delivery address of order #{order} to {city}?",
        "Order #{order} arrived with the {product} broken and the box crushed.",
        "Tracking for order #{order} has not updated since it left {city}.",
        "Only half of order #{order} arrived, the {product} is missing.",
    ],
    "technical": [
        "The app crashes every time I open the {product} page on my phone.",
        "I get error code {code} when I try to upload a photo.",
        "The website keeps logging me out after {days} minutes of use.",
        "Search results for {product} do not load, the spinner never stops.",
        "The checkout button does nothing when I use the {browser} browser.",
        "Push notifications stopped working after the update to version {version}.",
    ],
    "account": [
        "I cannot reset my password, the reset link for {first} {last} has expired.",
        "Please merge my two accounts, both are registered to {first} {last}.",
        "How do I delete my account and all data linked to {first} {last}?",
        "Change the name on my profile from {first} to {first2} please.",
        "My account {first}{n2} was locked after {days} failed logins on {weekday}, unlock it.",
        "I want to turn off two-factor login on the account of {first} {last}.",
    ],
}
GREETINGS = ["", "", "Hello, ", "Hi team, ", "Good morning, ", "Hey, ", "Dear support, "]
# Label-neutral sentences that make messages differ the way real ones do.
TICKET_FILLERS = ["I am writing from {city}.", "My customer number is C-{cust}.",
                  "This is my {ordinal} message about this.", "I have been a customer since {year}.",
                  "Sent from my {device}.", "I can be reached until {hour} pm on {weekday}.",
                  "Reference {ref}.", "{first} from the {city} office asked me to write.",
                  "It started last {weekday}.", "Please answer in {lang} if possible."]
REVIEW_FILLERS = ["I paid {amount} euros.", "Delivery took {days} days.", "Bought in {city}.",
                  "Gift for my {rel}.", "I use it every {weekday}.", "It came in a {colour} box.",
                  "My {rel} has the same one.", "Second order from this shop since {year}."]
ORDER_FILLERS = ["Reference {ref}.", "Invoice to {first} {last}.", "Payment by card as usual.",
                 "Call {first} on extension {ext} if anything is unclear.", "Customer C-{cust}.",
                 "Deliver between {hour} and {hour2} o'clock.", "Use the back entrance."]
DATE_FILLERS = ["Ref {ref}.", "Noted by {first} {last}.", "File {cust}.",
                "Copied to the {city} office.", "See folder {ext}."]
CLOSINGS = ["", "", " Thanks.", " Thank you!", " Regards, {first}.", " Please help.",
            " Best, {first} {last}."]
CLASSIFY_INSTRUCTIONS = [
    "Route the customer message to one team: billing, shipping, technical or account. "
    "Answer with the team name only.",
    "Which team should handle this message: billing, shipping, technical or account? "
    "Reply with one word.",
]

SENTIMENT_PARTS = {
    "positive": ["works perfectly", "exceeded my expectations", "is great value for money",
                 "arrived quickly and looks lovely", "is the best purchase I made this year",
                 "feels solid and well made"],
    "negative": ["stopped working after a week", "is cheaply made", "looks nothing like the photos",
                 "arrived damaged and support ignored me", "is a waste of money",
                 "broke the first time I used it"],
    "neutral": ["does what it says, nothing more", "is okay for the price",
                "is fine but the colour is a bit different", "arrived on time and works as described",
                "is average, neither good nor bad", "is acceptable but I expected more"],
}
SENTIMENT_OPENERS = ["The {product} {part}.", "Bought the {product} for my {rel} and it {part}.",
                     "After {days} days of use, the {product} {part}.",
                     "Honestly, this {product} {part}.", "Ordered a {product} to {city}; it {part}."]
RELATIVES = ["sister", "father", "office", "kitchen", "son", "grandmother", "flatmate", "studio"]
SENTIMENT_INSTRUCTIONS = [
    "Classify the sentiment of the review as positive, negative or neutral.",
    "Is this review positive, negative or neutral? Answer with one word.",
]

ORDER_TEMPLATES = [
    "Please send {qty} x {product} to our office in {city} by {weekday}.",
    "Hi, I'd like to order {qty} {product} for delivery to {city}.",
    "We need {qty} units of the {product}, shipping address is in {city}.",
    "Could you ship {qty} {product} to {city}? {first} will sign for it.",
    "Order request from {first} {last}: {product}, quantity {qty}, deliver to {city}.",
    "Add {qty} more {product} to the {city} shipment, thanks.",
]
EXTRACT_INSTRUCTIONS = [
    "Extract the product, quantity and city from the order message. Answer with JSON using the "
    "keys product, quantity and city.",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]

DATE_SENTENCES = [
    "The contract with {first} {last} was signed on {date}.",
    "Our office in {city} reopens on {date}.",
    "{first} was born on {date} in {city}.",
    "The invoice is due on {date}, please pay before then.",
    "Delivery to {city} is scheduled for {date}.",
    "The {product} warranty expires on {date}.",
    "We met {first} at the {city} fair on {date}.",
    "The next board meeting takes place on {date}.",
]
DATE_INSTRUCTIONS = ["Rewrite the date in the sentence as YYYY-MM-DD. Answer with the date only."]

QA_INDUSTRIES = ["shipbuilding", "cheese making", "textiles", "tourism", "glassware", "forestry",
                 "software", "brewing", "ceramics", "salt mining", "fishing", "clockmaking"]
QA_RIVERS = ["Alna", "Brisk", "Corra", "Dunmere", "Elve", "Fenn", "Garrow", "Hollin", "Isen",
             "Juvel", "Kessa", "Lorne", "Mirrin", "Nessa"]
QA_QUESTIONS = {
    "industry": ("What is the main industry of {town}?", "{industry}"),
    "mayor": ("Who is the mayor of {town}?", "{mayor}"),
    "founded": ("In which year was {town} founded?", "{founded}"),
    "river": ("Which river flows through {town}?", "the {river}"),
    "population": ("How many people live in {town}?", "{population}"),
}
QA_INSTRUCTION = "Answer the question using only the passage. Give a short answer.\n\nQuestion: "
SYLLABLES = ["or", "va", "ne", "kel", "mar", "thu", "bri", "sol", "den", "ka", "lin", "ro", "ste",
             "wen", "ga", "li", "mo", "tra", "ber", "qui"]

SOURCES = {
    "classification": ["zendesk_export_2024", "helpdesk_forms"],
    "sentiment": ["shop_reviews_v3", "app_store_reviews"],
    "extraction": ["order_inbox", "b2b_email_orders"],
    "date_format": ["contracts_ocr", "calendar_notes"],
    "qa": ["wiki_towns_synthetic", "gazetteer_v2"],
}
TAGS = {"classification": ["support", "routing"], "sentiment": ["reviews", "sentiment"],
        "extraction": ["orders", "json"], "date_format": ["dates", "normalization"],
        "qa": ["reading", "short-answer"]}


# ---------------------------------------------------------------------------------------------
# Clean examples, one function per category: (instruction, context, response)

def _fill(rng: random.Random, template: str, facts: dict[str, Any] | None = None,
          **extra: Any) -> str:
    values = {"order": rng.randint(10000, 99999), "inv": f"INV-{rng.randint(1000, 9999)}",
              "amount": f"{rng.randint(5, 400)}.{rng.randint(0, 99):02d}",
              "days": rng.randint(2, 21), "city": rng.choice(CITIES),
              "product": rng.choice(PRODUCTS), "code": f"E{rng.randint(100, 999)}",
              "browser": rng.choice(["Firefox", "Safari", "Chrome", "Edge"]),
              "version": f"{rng.randint(2, 9)}.{rng.randint(0, 19)}.{rng.randint(0, 9)}",
              "first": rng.choice(FIRST_NAMES), "first2": rng.choice(FIRST_NAMES),
              "last": rng.choice(LAST_NAMES), "rel": rng.choice(RELATIVES),
              "weekday": rng.choice(WEEKDAYS), "n2": rng.randint(10, 99),
              "cust": rng.randint(100000, 999999), "ordinal": rng.choice(["second", "third",
                                                                            "fourth", "fifth"]),
              "year": rng.randint(2009, 2023), "device": rng.choice(["iPhone", "tablet", "Pixel",
                                                                      "work laptop"]),
              "hour": rng.randint(1, 6), "hour2": rng.randint(7, 11),
              "ref": f"{rng.choice('ABCDEFGHKMNPRSTUVWXYZ')}{rng.randint(100, 999)}-"
                     f"{rng.randint(1000, 9999)}",
              "lang": rng.choice(["English", "German", "French", "Spanish"]),
              "colour": rng.choice(["blue", "brown", "white", "green", "grey"]),
              "ext": rng.randint(200, 899)}
    values.update(extra)
    if facts is not None:                       # what the text says, for follow-up questions
        facts.update(values)
    return template.format(**values)


def _fillers(rng: random.Random, pool: list[str], k_max: int, **extra: Any) -> str:
    picked = rng.sample(pool, rng.randint(0, k_max))
    return "".join(" " + _fill(rng, f, **extra) for f in picked)


# The ``_x_facts`` makers also return what the text says (for the follow-up questions of the
# conversations); ``make_x`` drops it. Both draw from ``rng`` in the same order.

def _classification_facts(rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    label = rng.choice(sorted(TICKET_TEMPLATES))
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    template = rng.choice(TICKET_TEMPLATES[label])
    values: dict[str, Any] = {}
    body = _fill(rng, template, values, first=first, last=last)
    greeting = rng.choice(GREETINGS)
    if greeting:
        body = greeting + body[0].lower() + body[1:]
    text = (body + _fillers(rng, TICKET_FILLERS, 2, first=first, last=last)
            + _fill(rng, rng.choice(CLOSINGS), first=first, last=last))
    order = str(values["order"]) if "{order}" in template else None
    return rng.choice(CLASSIFY_INSTRUCTIONS), text, label, {"label": label, "order": order}


def make_classification(rng: random.Random) -> tuple[str, str, str]:
    return _classification_facts(rng)[:3]


def _sentiment_facts(rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    label = rng.choice(sorted(SENTIMENT_PARTS))
    values: dict[str, Any] = {}
    text = _fill(rng, rng.choice(SENTIMENT_OPENERS), values,
                 part=rng.choice(SENTIMENT_PARTS[label]))
    text += _fillers(rng, REVIEW_FILLERS, 2)
    return (rng.choice(SENTIMENT_INSTRUCTIONS), text, label,
            {"label": label, "product": values["product"]})


def make_sentiment(rng: random.Random) -> tuple[str, str, str]:
    return _sentiment_facts(rng)[:3]


def _extraction_facts(rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    product, city, qty = rng.choice(PRODUCTS), rng.choice(CITIES), rng.randint(1, 60)
    text = _fill(rng, rng.choice(ORDER_TEMPLATES), product=product, city=city, qty=qty)
    text += _fillers(rng, ORDER_FILLERS, 2)
    answer = json.dumps({"product": product, "quantity": qty, "city": city})
    return EXTRACT_INSTRUCTIONS[0], text, answer, {"product": product, "quantity": qty,
                                                   "city": city}


def make_extraction(rng: random.Random) -> tuple[str, str, str]:
    return _extraction_facts(rng)[:3]


def _date_variants(day: dt.date, rng: random.Random) -> str:
    month = MONTHS[day.month - 1]
    return rng.choice([f"{month} {day.day}, {day.year}", f"{day.day} {month} {day.year}",
                       f"{month[:3]} {day.day} {day.year}", f"{day.day:02d}.{day.month:02d}.{day.year}",
                       f"{day.day} {month[:3]}. {day.year}"])


def _date_facts(rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    day = dt.date(1960, 1, 1) + dt.timedelta(days=rng.randint(0, 365 * 70))
    text = _fill(rng, rng.choice(DATE_SENTENCES), date=_date_variants(day, rng))
    text += _fillers(rng, DATE_FILLERS, 1)
    return DATE_INSTRUCTIONS[0], text, day.isoformat(), {"day": day}


def make_date(rng: random.Random) -> tuple[str, str, str]:
    return _date_facts(rng)[:3]


def _town_name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def make_town(rng: random.Random) -> dict[str, str]:
    town = _town_name(rng)
    return {"town": town, "industry": rng.choice(QA_INDUSTRIES),
            "mayor": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
            "founded": str(rng.randint(1150, 1890)), "river": rng.choice(QA_RIVERS),
            "population": f"{rng.randint(2, 95)},{rng.randint(0, 999):03d}",
            "region": f"{_town_name(rng)}shire", "elected": str(rng.randint(2008, 2023)),
            "variants": [rng.choice(v) for v in PASSAGE_SENTENCES],
            "order": rng.choice([(0, 1, 2), (0, 2, 1), (2, 0, 1)])}


PASSAGE_SENTENCES = [
    ["{town} lies on the {river} in {region} and was founded in {founded}.",
     "Founded in {founded}, {town} sits on the banks of the {river} in {region}.",
     "The {region} town of {town} grew up along the {river} after {founded}."],
    ["Its {population} residents mostly work in {industry}.",
     "Most of the {population} people who live there work in {industry}.",
     "{industry} employs most of its {population} inhabitants.".capitalize()],
    ["The current mayor of {town} is {mayor}.", "{mayor} has been mayor since {elected}.",
     "Since {elected} the town has been led by mayor {mayor}."],
]


def town_passage(t: dict[str, str]) -> str:
    sentences = [t["variants"][i].format(**t) for i in range(3)]
    sentences[1] = sentences[1][0].upper() + sentences[1][1:]
    return " ".join(sentences[i] for i in t["order"])


def make_qa(rng: random.Random, town: dict[str, str] | None = None,
            aspect: str | None = None) -> tuple[str, str, str]:
    town = town or make_town(rng)
    question, answer = QA_QUESTIONS[aspect or rng.choice(sorted(QA_QUESTIONS))]
    return QA_INSTRUCTION + question.format(**town), town_passage(town), answer.format(**town)


MAKERS = {"classification": make_classification, "sentiment": make_sentiment,
          "extraction": make_extraction, "date_format": make_date, "qa": make_qa}
FACT_MAKERS = {"classification": _classification_facts, "sentiment": _sentiment_facts,
               "extraction": _extraction_facts, "date_format": _date_facts}


# ---------------------------------------------------------------------------------------------
# Multi-turn conversations: the category's task, then one or two follow-up questions about the
# same message, review, order, date or passage, each answered exactly and briefly

CONVERSATION_SHARE = 0.15        # of the clean records
THREE_EXCHANGES = 0.3            # of the conversations (the rest have two)
SHAREGPT_EVERY = 3               # every third conversation is ShareGPT, the rest OpenAI
SYSTEM_SHARE = 0.3               # of the conversations open with a system turn
TEAMS = {"billing": "Payments team", "shipping": "Logistics team", "technical": "App support",
         "account": "Customer care"}   # who handles each route (fixed: learnable)
SYSTEM_PROMPTS = {
    "classification": "You are the triage assistant of an online shop's support desk.",
    "sentiment": "You read product reviews for a web shop.",
    "extraction": "You turn order e-mails into data for the warehouse.",
    "date_format": "You help clean up dates in scanned documents.",
    "qa": "You answer questions about a passage.",
}
SYSTEM_SUFFIXES = ["", " Answer briefly.", " Keep every answer short and exact."]
CONVERSATION_SOURCES = {"messages": ["support_chat_sessions", "assistant_logs_2024"],
                        "conversations": ["sharegpt_export"]}
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}

# Per category: follow-up kind -> (phrasings, answer from the facts)
FOLLOW_UPS: dict[str, dict[str, tuple[list[str], Any]]] = {
    "classification": {
        "team": (["Which team handles that?", "Which team should I forward it to?"],
                 lambda f: TEAMS[f["label"]]),
        "order": (["Which order number does the message mention? Answer none if there is none.",
                   "What is the order number in the message? Say none if it has none."],
                  lambda f: f["order"] or "none"),
    },
    "sentiment": {
        "product": (["Which product is the review about?",
                     "What product was reviewed? Answer with the product only."],
                    lambda f: f["product"]),
        "flag": (["Should the quality team follow it up? Answer yes or no.",
                  "Does this need a follow-up by the quality team? Yes or no."],
                 lambda f: "yes" if f["label"] == "negative" else "no"),
    },
    "extraction": {
        "city": (["Which city does it ship to?",
                  "Where should it be delivered? Answer with the city only."],
                 lambda f: f["city"]),
        "quantity": (["How many units were ordered?",
                      "What quantity was ordered? Answer with the number only."],
                     lambda f: str(f["quantity"])),
        "product": (["Which product was ordered?", "What is being ordered? Just the product."],
                    lambda f: f["product"]),
    },
    "date_format": {
        "dmy": (["Now write it as DD/MM/YYYY.", "Give the same date as DD/MM/YYYY."],
                lambda f: f"{f['day'].day:02d}/{f['day'].month:02d}/{f['day'].year}"),
        "month": (["Which month is that?", "In which month is that date? Answer with its name."],
                  lambda f: MONTHS[f["day"].month - 1]),
    },
}


def _first_exchange(rng: random.Random, category: str
                    ) -> tuple[str, str, dict[str, Callable[[], tuple[str, str]]]]:
    """(user turn, assistant turn, follow-up kind -> a function giving (question, answer))."""
    if category == "qa":
        town, aspects = make_town(rng), sorted(QA_QUESTIONS)
        first = rng.choice(aspects)
        inst, ctx, resp = make_qa(rng, town, first)

        def qa_follow_up(aspect: str) -> Callable[[], tuple[str, str]]:
            def make() -> tuple[str, str]:
                question, answer = QA_QUESTIONS[aspect]
                prefix = rng.choice(["", "", "And ", "One more: "])
                question = question.format(**town)
                if prefix and not prefix.endswith(": "):
                    question = question[0].lower() + question[1:]
                return prefix + question, answer.format(**town)
            return make

        follow = {a: qa_follow_up(a) for a in aspects if a != first}
    else:
        inst, ctx, resp, facts = FACT_MAKERS[category](rng)

        def follow_up(phrasings: list[str], answer: Any) -> Callable[[], tuple[str, str]]:
            return lambda: (rng.choice(phrasings), answer(facts))

        follow = {kind: follow_up(*spec) for kind, spec in FOLLOW_UPS[category].items()}
    return inst + ("\n\n" + ctx if ctx else ""), resp, follow


def make_conversation(rng: random.Random, category: str) -> list[tuple[str, str]]:
    """(role, content) turns: an optional system turn, then two or three user/assistant
    exchanges, the first the category's task."""
    user, answer, follow = _first_exchange(rng, category)
    turns = [("user", user), ("assistant", answer)]
    n_follow = 2 if rng.random() < THREE_EXCHANGES else 1
    for kind in rng.sample(sorted(follow), n_follow):
        question, reply = follow[kind]()
        turns += [("user", question), ("assistant", reply)]
    if rng.random() < SYSTEM_SHARE:
        turns.insert(0, ("system", SYSTEM_PROMPTS[category] + rng.choice(SYSTEM_SUFFIXES)))
    return turns


def conversation_records(n: int, seed: int, first_id: int = 1) -> Iterator[dict[str, Any]]:
    """``n`` clean multi-turn records, OpenAI (``messages``) or ShareGPT (``conversations``)
    shaped, with the same enrichment fields as the others; ids from ``first_id`` on. Their own
    random stream, so they leave ``clean_records`` as it was."""
    rng = random.Random(f"conversations-{seed}")
    cats, weights = zip(*CATEGORY_WEIGHTS.items())
    for idx in range(first_id, first_id + n):
        category = rng.choices(cats, weights)[0]
        turns = make_conversation(rng, category)
        created = dt.datetime(2024, 1, 1) + dt.timedelta(seconds=rng.randint(0, 365 * 86400))
        quality = rng.betavariate(6, 1.6) if rng.random() > 0.06 else rng.uniform(0.1, 0.45)
        if (idx - first_id) % SHAREGPT_EVERY == SHAREGPT_EVERY - 1:
            key = "conversations"
            messages = [{"from": SHAREGPT_ROLES[r], "value": c} for r, c in turns]
        else:
            key = "messages"
            messages = [{"role": r, "content": c} for r, c in turns]
        yield {"id": f"demo-{idx:06d}", "category": category, key: messages,
               "source": rng.choice(CONVERSATION_SOURCES[key]), "quality_score": round(quality, 3),
               "tags": list(TAGS[category]) + ["multi-turn"],
               "created_at": created.isoformat() + "Z"}


def conversation_count(n_records: int) -> int:
    """How many of ``n_records`` clean records are conversations."""
    return round(n_records * CONVERSATION_SHARE)


# ---------------------------------------------------------------------------------------------
# Records with enrichment fields

def _enrich(rng: random.Random, idx: int, category: str, inst: str, ctx: str,
            resp: str) -> dict[str, Any]:
    created = dt.datetime(2024, 1, 1) + dt.timedelta(seconds=rng.randint(0, 365 * 86400))
    quality = rng.betavariate(6, 1.6) if rng.random() > 0.06 else rng.uniform(0.1, 0.45)
    tags = list(TAGS[category]) + (["short"] if len(ctx) < 80 else [])
    return {"id": f"demo-{idx:06d}", "category": category, "instruction": inst, "context": ctx,
            "response": resp, "source": rng.choice(SOURCES[category]),
            "quality_score": round(quality, 3), "tags": tags,
            "created_at": created.isoformat() + "Z"}


def _reshape(rng: random.Random, rec: dict[str, Any]) -> dict[str, Any]:
    """A few records arrive in the other common shapes, as after merging exports."""
    roll = rng.random()
    if roll < 0.04:  # alpaca
        rec = dict(rec, input=rec.pop("context"), output=rec.pop("response"))
        rec["source"] = "legacy_alpaca_export"
        return {k: rec[k] for k in ("id", "category", "instruction", "input", "output", "source",
                                    "quality_score", "tags", "created_at")}
    if roll < 0.08:  # chat
        user = rec["instruction"] + ("\n\n" + rec["context"] if rec["context"] else "")
        return {"id": rec["id"], "category": rec["category"],
                "messages": [{"role": "user", "content": user},
                             {"role": "assistant", "content": rec["response"]}],
                "source": "chat_logs", "quality_score": rec["quality_score"], "tags": rec["tags"],
                "created_at": rec["created_at"]}
    if roll < 0.10:  # prompt / completion
        prompt = rec["instruction"] + ("\n\n" + rec["context"] if rec["context"] else "")
        return {"id": rec["id"], "category": rec["category"], "prompt": prompt,
                "completion": rec["response"], "source": "completions_dump",
                "quality_score": rec["quality_score"], "tags": rec["tags"],
                "created_at": rec["created_at"]}
    return rec


def clean_records(n: int, seed: int) -> Iterator[dict[str, Any]]:
    """``n`` clean records in the instruction/context/response shape (no dirt, no reshaping)."""
    rng = random.Random(seed)
    cats, weights = zip(*CATEGORY_WEIGHTS.items())
    shared_town: dict[str, str] | None = None
    for idx in range(1, n + 1):
        category = rng.choices(cats, weights)[0]
        if category == "qa" and shared_town is not None:
            inst, ctx, resp = make_qa(rng, shared_town, "industry")  # a second question, same passage
            shared_town = None
        elif category == "qa":
            town = make_town(rng)
            inst, ctx, resp = make_qa(rng, town, rng.choice(["mayor", "founded", "river", "population"]))
            shared_town = town if rng.random() < 0.12 else None
        else:
            inst, ctx, resp = MAKERS[category](rng)
        yield _enrich(rng, idx, category, inst, ctx, resp)


# ---------------------------------------------------------------------------------------------
# Dirt

PII_SNIPPETS = [
    " You can reach me at {first}.{last}@example.com.",
    " Call me back on +44 20 7946 0{n3}.",
    " My number is (415) 555-0{n3}.",
    " Contact: {first}_{last}{n2}@mailbox.org",
    " My API key is sk-{key} if you need it.",
    " Our token hf_{key}{key2} stopped working.",
]


def _pii_snippet(rng: random.Random) -> str:
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
    return rng.choice(PII_SNIPPETS).format(
        first=rng.choice(FIRST_NAMES).lower(), last=rng.choice(LAST_NAMES).lower(),
        n3=f"{rng.randint(0, 999):03d}", n2=rng.randint(10, 99),
        key="".join(rng.choice(alphabet) for _ in range(24)),
        key2="".join(rng.choice(alphabet) for _ in range(12)))


def _pii(rng: random.Random, rec: dict[str, Any]) -> dict[str, Any]:
    return dict(rec, context=rec["context"] + _pii_snippet(rng))


def _turn_keys(rec: dict[str, Any]) -> tuple[str, str, str]:
    """(list field, role key, content key) of an OpenAI or ShareGPT conversation record."""
    return ("messages", "role", "content") if "messages" in rec else \
        ("conversations", "from", "value")


def _conversation_pii(rng: random.Random, rec: dict[str, Any]) -> dict[str, Any]:
    """PII in the customer's first message (scrubbed by the prep stage, the record kept)."""
    field, role, content = _turn_keys(rec)
    turns = [dict(t) for t in rec[field]]
    first = next(t for t in turns if t[role] in ("user", "human"))
    first[content] += _pii_snippet(rng)
    return dict(rec, **{field: turns})


def _broken_conversation(rng: random.Random, rec: dict[str, Any], kind: int) -> dict[str, Any]:
    """A conversation the prep stage must reject: 0, it ends on a user turn (the last answer
    lost); 1, two assistant turns in a row (a follow-up question lost); 2, an empty assistant
    turn."""
    field, role, content = _turn_keys(rec)
    turns = [dict(t) for t in rec[field]]
    if kind == 0:
        turns = turns[:-1]
    elif kind == 1:
        del turns[-2]
    else:
        first_answer = next(t for t in turns if t[role] in ("assistant", "gpt"))
        first_answer[content] = rng.choice(["", " ", "\n"])
    return dict(rec, **{field: turns})


def _near_duplicate(rng: random.Random, rec: dict[str, Any]) -> dict[str, Any]:
    variant = rng.randrange(4)
    ctx = rec["context"]
    if variant == 0:
        ctx = ctx.lower()
    elif variant == 1:
        ctx = "  " + ctx.replace(". ", ".  ").rstrip(".!") + " !!"
    elif variant == 2:
        ctx = ctx.replace(",", "").replace("  ", " ")
    else:
        ctx = ctx.upper()
    return dict(rec, context=ctx)


def _unicode_dirt(rng: random.Random, rec: dict[str, Any]) -> dict[str, Any]:
    variant = rng.randrange(4)
    ctx = rec["context"]
    if variant == 0:
        ctx = ctx.replace(" ", "\u00a0", 2)              # no-break spaces
    elif variant == 1:
        ctx = ctx.replace(" ", " \u200b", 1) + "\u0007"   # zero-width space, BEL
    elif variant == 2:
        ctx = unicodedata.normalize("NFD", "Café " + ctx)  # decomposed accent
    else:
        ctx = ctx.replace(". ", ".\r\n", 1) + "   "        # CRLF, trailing spaces
    return dict(rec, context=ctx)


def _overlong(rng: random.Random, idx: int) -> dict[str, Any]:
    sentences = [make_sentiment(rng)[1] for _ in range(60)]
    rec = _enrich(rng, idx, "sentiment", SENTIMENT_INSTRUCTIONS[0], " ".join(sentences), "neutral")
    rec["tags"] = rec["tags"] + ["long"]
    return rec


def build_lines(n: int, seed: int, dirt: bool = True) -> list[bytes]:
    """The demo file's lines as bytes (one line is deliberately not UTF-8): single-turn records
    and conversations (``conversation_count`` of the clean ones), shuffled together."""
    reingest = {"created_at": "2025-01-15T09:00:00Z", "source": "reingest_2025"}
    if not dirt:
        n_conv = conversation_count(n)
        records = list(clean_records(n - n_conv, seed))
        records += conversation_records(n_conv, seed, first_id=n - n_conv + 1)
        random.Random(seed + 2).shuffle(records)
        return [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in records]
    budget = max(20, n // 20)
    n_exact, n_near, n_bad = budget * 25 // 100, budget * 20 // 100, budget * 12 // 100 + 4
    n_clean = n - n_exact - n_near - n_bad - 8          # 8: overlong + 7 broken/blank lines
    n_conv = max(4, conversation_count(n_clean))
    n_single = n_clean - n_conv
    records = list(clean_records(n_single, seed))
    conversations = list(conversation_records(n_conv, seed, first_id=n_single + 1))
    rng = random.Random(seed + 1)
    pii_ok = [i for i, r in enumerate(records) if r["category"] in ("classification", "extraction")]
    pii_picks = set(rng.sample(pii_ok, min(len(pii_ok), budget * 18 // 100)))
    for i in sorted(pii_picks):                                        # PII in the message
        records[i] = _pii(rng, records[i])
    picks = rng.sample([i for i in range(n_single) if i not in pii_picks], budget * 8 // 100 + 2)
    for i in picks:                                                    # stray characters
        records[i] = _unicode_dirt(rng, records[i])
    extra: list[dict[str, Any]] = []
    # 1 of the exact copies and 3 of the bad records are conversations (below)
    sources = rng.sample(range(n_single), n_exact + n_near + n_bad - 4)
    n_copies = n_exact - 1
    for i in sources[:n_copies]:                                       # re-ingested copies
        extra.append(dict(records[i], **reingest))
    for i in sources[n_copies:n_copies + n_near]:                      # near duplicates
        extra.append(_near_duplicate(rng, records[i]))
    for k, i in enumerate(sources[n_copies + n_near:]):                # bad responses
        bad = dict(records[i])
        if k % 4 == 0:
            bad["response"] = rng.choice(["", "   ", "\n"])
        elif k % 4 == 1:
            bad["response"] = None
        elif k % 4 == 2:
            bad.pop("response")
        else:
            bad["response"] = rng.choice([42, ["positive"], {"label": "billing"}])
        extra.append(bad)
    good = [i for i, c in enumerate(conversations) if c["quality_score"] >= 0.5] or \
        list(range(n_conv))                        # rejected for their shape, not their quality
    conv_sources = rng.sample(good, 4) if len(good) >= 4 else [good[k % len(good)]
                                                               for k in range(4)]
    extra.append(dict(conversations[conv_sources[0]], **reingest))   # a re-ingested conversation
    for kind, i in enumerate(conv_sources[1:]):                      # malformed conversations
        extra.append(_broken_conversation(rng, conversations[i], kind))
    rest = [i for i in range(n_conv) if i not in conv_sources]
    for i in rng.sample(rest, min(len(rest), max(1, budget * 2 // 100))):   # PII in a chat
        conversations[i] = _conversation_pii(rng, conversations[i])
    extra.append(_overlong(rng, 0))
    for k, rec in enumerate(extra, start=n_clean + 1):
        rec["id"] = f"demo-{k:06d}"
    shaped = [_reshape(rng, r) for r in records]
    lines = [json.dumps(r, ensure_ascii=False).encode("utf-8")
             for r in shaped + conversations + extra]
    cut = json.dumps(records[3], ensure_ascii=False).encode("utf-8")
    latin1 = dict(records[5], id="demo-latin1", context="Le caf\u00e9 est ferm\u00e9 le lundi.")
    lines += [cut[: len(cut) // 2], cut[: len(cut) - 7],               # cut mid-write
              b"<html><body>502 Bad Gateway</body></html>",
              b'["demo", "a list, not an object"]', b"", b"",
              json.dumps(latin1, ensure_ascii=False).encode("latin-1")]
    random.Random(seed + 2).shuffle(lines)
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=1234, help="random seed (same seed, same file)")
    parser.add_argument("--n", type=int, default=2000, help="number of lines, dirt included")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSONL file to write")
    parser.add_argument("--clean", action="store_true", help="no dirt, every record valid")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 40:
        print("error: --n must be at least 40", file=sys.stderr)
        return 2
    lines = build_lines(args.n, args.seed, dirt=not args.clean)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    tmp.write_bytes(b"\n".join(lines) + b"\n")
    tmp.replace(args.output)
    print(f"wrote {len(lines)} lines to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
