"""multiskill_assistant's three skills and twelve topic turns, phrased as users phrase them (not
copied from the skills' goals): each names the skill that should answer it."""

FAIRY_TALES, COOKING, TRAVEL = "fairytales_prompted_skill", "cooking_prompted_skill", "travel_prompted_skill"
TOPIC_TURNS = [
    (FAIRY_TALES, "My daughter can't fall asleep. Could you tell her a story about a brave little mouse?"),
    (FAIRY_TALES, "Make up a tale about a unicorn who lost its horn."),
    (FAIRY_TALES, "I want to hear a story about a princess and a frog."),
    (FAIRY_TALES, "Tell my kids something magical before bed, maybe about a wizard."),
    (COOKING, "What can I make for dinner tonight with chicken and rice?"),
    (COOKING, "How long should I boil an egg so the yolk stays soft?"),
    (COOKING, "Give me an easy recipe for pancakes."),
    (COOKING, "I have tomatoes, pasta and garlic. What should I cook?"),
    (TRAVEL, "I'm thinking about visiting Japan in spring. What should I see?"),
    (TRAVEL, "Which is cheaper to get from Berlin to Prague: the train or a flight?"),
    (TRAVEL, "Can you recommend a good hotel in Rome near the center?"),
    (TRAVEL, "What should I pack for a week in Iceland?"),
]
