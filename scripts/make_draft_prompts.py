#!/usr/bin/env python3
"""Writes bench/draft_train_prompts.jsonl: the prompts `heterospec
train-draft` answers with the target to make a draft head's training data.
Five categories (chat, code, math, instructions, summarization) from
templates and topic lists; none is a benchmark or calibration prompt
(tests/draft_head.rs checks). Deterministic: run it again, get the same file."""
import itertools, json, random, sys

rng = random.Random(7)
topics = ["the ocean", "volcanoes", "the moon", "bees", "rainforests", "deserts", "the human heart",
          "electricity", "magnets", "clouds", "glaciers", "the printing press", "ancient Egypt", "the Roman Empire",
          "photosynthesis", "black holes", "dinosaurs", "recycling", "solar panels", "the internet", "vaccines",
          "earthquakes", "coral reefs", "the water cycle", "gravity", "chess", "jazz music", "the Olympic Games",
          "coffee", "tea", "bread baking", "bicycles", "trains", "airplanes", "penguins", "elephants", "wolves",
          "owls", "mushrooms", "tomatoes", "the seasons", "rainbows", "time zones", "libraries", "museums",
          "public parks", "gardening", "camping", "friendship", "kindness", "habits", "sleep", "exercise",
          "meditation", "saving money", "learning a language", "painting", "photography", "robots", "satellites"]
people = ["a child", "a teenager", "a busy parent", "a retiree", "a new employee", "a student", "a tourist",
          "a scientist", "a chef", "a farmer"]
chat_t = ["Tell me something interesting about {t}.", "Why do people like {t}?", "What is your opinion of {t}?",
          "Can you explain {t} to {p}?", "What are three surprising facts about {t}?",
          "How would you describe {t} in a few sentences?", "What should {p} know about {t}?",
          "Is {t} important? Why or why not?", "Share a short story involving {t}.",
          "What questions do people often ask about {t}?"]
code_tasks = ["reverses a string", "checks whether a number is prime", "returns the largest item in a list",
              "counts the vowels in a word", "computes the factorial of n", "merges two sorted lists",
              "removes duplicates from a list", "converts Celsius to Fahrenheit", "checks if a word is a palindrome",
              "sums the digits of an integer", "finds the second smallest number in a list",
              "counts how often each word appears in a sentence", "returns the n-th Fibonacci number",
              "flattens a nested list", "capitalizes the first letter of every word", "computes the average of a list",
              "checks whether two strings are anagrams", "finds the greatest common divisor of two numbers",
              "rotates a list by k positions", "returns all even numbers from a list", "validates an email address",
              "reads a text file and counts its lines", "sorts a list of tuples by their second item",
              "converts a binary string to an integer", "generates a multiplication table"]
langs = ["Python", "JavaScript", "Rust", "C", "Java", "Go"]
code_t = ["Write a {l} function that {c}.", "Show me how to write a {l} program that {c}.",
          "In {l}, how do I write code that {c}?", "Write a short {l} snippet that {c}, with comments."]
concepts = ["a variable", "a loop", "recursion", "a hash map", "a linked list", "an API", "a compiler",
            "a class", "an exception", "unit testing", "version control", "a database index", "a stack",
            "a queue", "binary search"]
math_t = ["What is {a} plus {b}?", "What is {a} times {b}?", "What is {a} minus {b}?",
          "If I have {a} apples and buy {b} more, how many do I have?",
          "A train travels {a} miles in {b} hours. What is its average speed?",
          "What is {a} percent of {b}?", "Solve for x: x + {a} = {b}.", "Is {a} divisible by {b}? Explain.",
          "What is the perimeter of a rectangle that is {a} by {b}?",
          "A shop sells pens for {a} cents each. How much do {b} pens cost?",
          "What is the area of a square with sides of {a}?", "Round {a}.{b} to the nearest whole number."]
instr_t = ["Give me step-by-step instructions for {x}.", "How do I {x}?", "List the steps to {x}.",
           "Explain how to {x} for a beginner.", "What is the best way to {x}?"]
instr_x = ["make a cup of tea", "plant a tree", "write a thank-you note", "tie a tie", "change a flat tire",
           "clean a laptop keyboard", "make a paper airplane", "prepare for a job interview", "bake cookies",
           "organize a closet", "start running", "write a resume", "set up a budget", "learn to juggle",
           "care for a houseplant", "pack for a weekend trip", "make pancakes", "wash a car", "study for an exam",
           "plan a birthday party", "build a bird house", "brew coffee with a French press", "fold a shirt",
           "make a smoothie", "write a short poem", "keep a journal", "clean a bathroom", "boil an egg",
           "paint a room", "introduce yourself at a meeting"]
passages = [
    "The town library opened a new reading room this spring. It has large windows, quiet desks and a corner for children. Visitors say it is now the most popular place in town on rainy days.",
    "Maria started a small bakery in her neighborhood. At first only a few people came, but her bread became famous. Now there is a line outside every Saturday morning.",
    "Scientists have found that some birds can recognize human faces. In experiments, crows remembered people who had scared them and warned other crows about them for years.",
    "A group of students built a small robot that sorts recycling. It uses a camera to tell plastic from paper and moves each item into the right bin.",
    "The city decided to close one main street to cars every Sunday. People now walk, cycle and play games there, and local shops report more customers.",
    "Drinking enough water helps the body control its temperature, protects joints and keeps the skin healthy. Many people do not notice when they are mildly dehydrated.",
    "The old bridge over the river was repaired after fifty years. Engineers replaced the steel beams and added a wide path for pedestrians and bicycles.",
    "A farmer noticed that planting flowers between rows of vegetables attracted more bees. His harvest grew larger, and neighbors began to copy the idea.",
    "Learning a musical instrument takes patience. Short daily practice sessions are often more useful than long sessions once a week.",
    "The museum opened an exhibit about the history of flight, from early balloons to modern jets. Children can sit in a real cockpit and try a flight simulator.",
    "Sleep helps the brain store memories. Studies show that students who sleep well before an exam often remember more than those who stay up late studying.",
    "A small island village now gets most of its electricity from wind and sun. The project cut fuel costs and made power cuts rare.",
    "Volunteers cleaned the beach last weekend and collected more than two hundred bags of trash. Most of it was plastic bottles and fishing nets.",
    "The company let employees work from home two days a week. A survey later found that most people felt less stressed and got more done.",
    "An old lighthouse on the coast was turned into a small hotel. Guests can climb to the top and watch ships pass at sunset.",
]
summ_t = ["Summarize this text in one sentence: {x}", "Give a short summary of the following: {x}",
          "What is the main idea of this passage? {x}", "Summarize the following in two sentences: {x}",
          "Write a headline for this text: {x}"]

def pick(template_list, **lists):
    out = []
    for t in template_list:
        keys = [k for k in lists if "{" + k + "}" in t]
        for combo in itertools.product(*[lists[k] for k in keys]):
            out.append(t.format(**dict(zip(keys, combo))))
    return out

def main(n_per_category=300):
    existing = set()
    for path in ["bench/prompts.jsonl", "bench/calibration_prompts.jsonl"]:
        for line in open(path):
            existing.add(json.loads(line)["prompt"])
    cats = {
        "chat": pick(chat_t, t=topics, p=people),
        "code": pick(code_t, l=langs, c=code_tasks) + [f"Explain what {c} is in programming." for c in concepts],
        "math": [t.format(a=rng.randint(2, 99), b=rng.randint(2, 99)) for t in math_t for _ in range(30)],
        "instructions": pick(instr_t, x=instr_x),
        "summarization": pick(summ_t, x=passages),
    }
    rows = []
    for cat, prompts in cats.items():
        prompts = sorted(set(p for p in prompts if p not in existing))
        rng.shuffle(prompts)
        rows += [{"category": cat, "prompt": p} for p in prompts[:n_per_category]]
    rows += second_round(existing | {r["prompt"] for r in rows})
    with open("bench/draft_train_prompts.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(len(rows), "prompts", file=sys.stderr)

# A second round with other question forms, appended after the first (so a
# data cache of the first round stays valid).
things = ["a dog", "a cat", "a hamster", "a parrot", "a garden", "a small apartment", "a road trip", "a picnic",
          "a rainy weekend", "a first date", "a job interview", "a science fair", "a school project", "a birthday",
          "a wedding speech", "a team meeting", "a book club", "a hiking trip", "a family dinner", "a new hobby",
          "a morning routine", "a study plan", "a small business", "a charity event", "a movie night", "a vacation",
          "a camping trip", "a garage sale", "a podcast", "a blog"]
fields = ["history", "biology", "chemistry", "physics", "astronomy", "geography", "economics", "psychology",
          "music", "art", "literature", "philosophy", "medicine", "engineering", "architecture", "computer science",
          "mathematics", "ecology", "nutrition", "sports"]
pairs = [("cats", "dogs"), ("tea", "coffee"), ("trains", "planes"), ("books", "movies"), ("summer", "winter"),
         ("cities", "villages"), ("email", "phone calls"), ("running", "swimming"), ("Python", "JavaScript"),
         ("renting", "buying a home"), ("paper books", "e-readers"), ("solar power", "wind power"),
         ("working from home", "working in an office"), ("the sun", "the moon"), ("rivers", "lakes")]
chat2_t = ["Give me {n} tips for {x2}.", "What is a good name for {th}?", "Recommend a few ideas for {th}.",
           "What are the pros and cons of {th}?", "How can I make {th} more fun?", "What should I bring to {th}?"]
chat2_x = ["saving time in the morning", "staying focused", "making new friends", "eating healthier",
           "reading more books", "drinking more water", "learning faster", "keeping a clean room",
           "being more creative", "feeling less stressed", "writing better emails", "speaking in public"]
field_t = ["What is {f} about?", "Why is {f} useful?", "Name three famous ideas in {f}.",
           "How would I start learning {f}?", "What jobs use {f}?"]
compare_t = ["Compare {a} and {b}.", "Which is better, {a} or {b}? Explain briefly.",
             "What is the difference between {a} and {b}?"]
write_t = ["Write a short poem about {t}.", "Write a short story about {t}.", "Write a haiku about {t}.",
           "Write a short email inviting a friend to {th}.", "Write a tweet about {t}.",
           "Write a short paragraph describing {t}."]
code2_t = ["What does this {l} code do? {snippet}", "Find the bug in this {l} code: {snippet}",
           "Rewrite this {l} code to be clearer: {snippet}"]
snippets = {"Python": ["for i in range(10): print(i * i)", "def f(x): return x if x < 2 else f(x-1) + f(x-2)",
                       "nums = [3, 1, 2]; nums.sort(); print(nums[0])", "s = 'hello'; print(s[::-1])",
                       "total = 0\nfor n in [1, 2, 3]: total += n\nprint(total)"],
            "JavaScript": ["const a = [1, 2, 3].map(x => x * 2);", "function add(a, b) { return a - b; }",
                           "let s = 'abc'; console.log(s.toUpperCase());", "for (let i = 0; i <= 5; i++) console.log(i);"],
            "C": ["int sum(int a, int b) { return a + b; }", "for (int i = 0; i < 10; i++) printf(\"%d\", i);"]}
math2_t = ["Convert {a} kilometers to meters.", "What is {a} divided by {b}, rounded to two decimals?",
           "What is the average of {a}, {b} and {c}?", "If a shirt costs {a} dollars and is {c} percent off, what is the price?",
           "What is {a} squared?", "Simplify the fraction {a}/{b}.", "How many minutes are in {a} hours?",
           "A recipe needs {a} grams of flour per cake. How much flour for {c} cakes?",
           "Tom is {a} years old. His sister is {c} years younger. How old is she?",
           "What is the sum of the numbers from 1 to {a}?"]

def second_round(existing):
    out = []
    def add(cat, prompts, n):
        prompts = sorted(set(p for p in prompts if p not in existing))
        rng.shuffle(prompts)
        out.extend({"category": cat, "prompt": p} for p in prompts[:n])
    add("chat", pick(chat2_t, n=["three", "five"], x2=chat2_x, th=things) + pick(field_t, f=fields)
        + [t.format(a=a, b=b) for t in compare_t for a, b in pairs], 420)
    add("instructions", pick(write_t, t=topics[:30], th=things), 300)
    add("code", [t.format(l=l, snippet=sn) for t in code2_t for l, sns in snippets.items() for sn in sns]
        + pick(["Write a {l} class that represents {th}."], l=langs, th=things), 180)
    add("math", [t.format(a=rng.randint(2, 99), b=rng.randint(2, 99), c=rng.randint(2, 9)) for t in math2_t
                 for _ in range(25)], 200)
    return out

if __name__ == "__main__":
    main()
