"""Word lists of the sample chat data (make_assets.py), shared with the pretraining corpus
(pretrain_tiny.py), which uses the words in unrelated sentences. A module of its own so that
neither builder imports the other."""

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Australia", "Canberra"), ("Russia", "Moscow"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"), ("Ireland", "Dublin"),
    ("Austria", "Vienna"), ("Turkey", "Ankara"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("Morocco", "Rabat"),
]

WORDS = [
    "apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "house", "train", "green",
    "light", "water", "bread", "chair", "table", "horse", "mouse", "plant", "smile", "storm",
    "cat", "dog", "sun", "moon", "star", "tree", "bird", "fish", "book", "door",
    "rain", "snow", "wind", "fire", "milk", "rose", "ship", "road", "lamp", "cake",
    "banana", "orange", "yellow", "purple", "rocket", "garden", "window", "planet", "forest", "castle",
    "pencil", "basket", "summer", "winter", "spring", "butter", "candle", "button", "dragon", "silver",
]

NAMES = [
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack",
    "Kate", "Leo", "Mia", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tina", "Victor",
]

# (from-unit plural, to-unit plural, factor)
CONVERSIONS = [
    ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("kilograms", "grams", 1000),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("liters", "milliliters", 1000),
]
