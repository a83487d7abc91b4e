"""Multilingual word lists for few-shot prompts (translation, lists, facts).

Pure data plus two small helpers: :func:`concept_rows` flattens :data:`CONCEPTS`
into one row per (concept, language), and :func:`validate` checks that every
table is complete. Nothing here runs at import time.

Conventions: words are lowercase except German nouns (capitalised as German
requires) and English weekday and month names; nouns are singular where the
language allows; colours are the masculine singular adjective (Chinese uses the
noun form ``…色``); verbs are infinitives (Russian imperfective). Concepts whose
English, French, German and Spanish words would be identical (``table``,
``hotel``, ``hand``, ``wind``...) are left out so that a prompt's answer is never
just a copy of its question.
"""
from __future__ import annotations

LANGUAGES: dict[str, str] = {
    "en": "English",
    "fr": "Français",
    "de": "Deutsch",
    "es": "Español",
    "ru": "Русский",
    "zh": "中文",
    "ja": "日本語",
}

CATEGORIES: tuple[str, ...] = (
    "animal", "body", "nature", "food", "object", "place",
    "person", "abstract", "color", "time", "number", "action",
)

CONCEPTS: list[dict] = [
    # --- animals ---
    {"concept": "dog", "category": "animal", "en": "dog", "fr": "chien", "de": "Hund", "es": "perro", "ru": "собака", "zh": "狗", "ja": "犬"},
    {"concept": "cat", "category": "animal", "en": "cat", "fr": "chat", "de": "Katze", "es": "gato", "ru": "кошка", "zh": "猫", "ja": "猫"},
    {"concept": "horse", "category": "animal", "en": "horse", "fr": "cheval", "de": "Pferd", "es": "caballo", "ru": "лошадь", "zh": "马", "ja": "馬"},
    {"concept": "bird", "category": "animal", "en": "bird", "fr": "oiseau", "de": "Vogel", "es": "pájaro", "ru": "птица", "zh": "鸟", "ja": "鳥"},
    {"concept": "fish", "category": "animal", "en": "fish", "fr": "poisson", "de": "Fisch", "es": "pez", "ru": "рыба", "zh": "鱼", "ja": "魚"},
    {"concept": "cow", "category": "animal", "en": "cow", "fr": "vache", "de": "Kuh", "es": "vaca", "ru": "корова", "zh": "牛", "ja": "牛"},
    {"concept": "pig", "category": "animal", "en": "pig", "fr": "cochon", "de": "Schwein", "es": "cerdo", "ru": "свинья", "zh": "猪", "ja": "豚"},
    {"concept": "sheep", "category": "animal", "en": "sheep", "fr": "mouton", "de": "Schaf", "es": "oveja", "ru": "овца", "zh": "羊", "ja": "羊"},
    {"concept": "chicken", "category": "animal", "en": "chicken", "fr": "poule", "de": "Huhn", "es": "gallina", "ru": "курица", "zh": "鸡", "ja": "鶏"},
    {"concept": "mouse", "category": "animal", "en": "mouse", "fr": "souris", "de": "Maus", "es": "ratón", "ru": "мышь", "zh": "老鼠", "ja": "ネズミ"},
    {"concept": "bear", "category": "animal", "en": "bear", "fr": "ours", "de": "Bär", "es": "oso", "ru": "медведь", "zh": "熊", "ja": "熊"},
    {"concept": "snake", "category": "animal", "en": "snake", "fr": "serpent", "de": "Schlange", "es": "serpiente", "ru": "змея", "zh": "蛇", "ja": "蛇"},
    {"concept": "rabbit", "category": "animal", "en": "rabbit", "fr": "lapin", "de": "Kaninchen", "es": "conejo", "ru": "кролик", "zh": "兔子", "ja": "うさぎ"},
    {"concept": "duck", "category": "animal", "en": "duck", "fr": "canard", "de": "Ente", "es": "pato", "ru": "утка", "zh": "鸭子", "ja": "アヒル"},
    {"concept": "frog", "category": "animal", "en": "frog", "fr": "grenouille", "de": "Frosch", "es": "rana", "ru": "лягушка", "zh": "青蛙", "ja": "カエル"},
    {"concept": "monkey", "category": "animal", "en": "monkey", "fr": "singe", "de": "Affe", "es": "mono", "ru": "обезьяна", "zh": "猴子", "ja": "猿"},
    {"concept": "bee", "category": "animal", "en": "bee", "fr": "abeille", "de": "Biene", "es": "abeja", "ru": "пчела", "zh": "蜜蜂", "ja": "蜂"},
    {"concept": "butterfly", "category": "animal", "en": "butterfly", "fr": "papillon", "de": "Schmetterling", "es": "mariposa", "ru": "бабочка", "zh": "蝴蝶", "ja": "蝶"},
    {"concept": "spider", "category": "animal", "en": "spider", "fr": "araignée", "de": "Spinne", "es": "araña", "ru": "паук", "zh": "蜘蛛", "ja": "クモ"},
    {"concept": "goat", "category": "animal", "en": "goat", "fr": "chèvre", "de": "Ziege", "es": "cabra", "ru": "коза", "zh": "山羊", "ja": "ヤギ"},
    {"concept": "fox", "category": "animal", "en": "fox", "fr": "renard", "de": "Fuchs", "es": "zorro", "ru": "лиса", "zh": "狐狸", "ja": "狐"},
    {"concept": "ant", "category": "animal", "en": "ant", "fr": "fourmi", "de": "Ameise", "es": "hormiga", "ru": "муравей", "zh": "蚂蚁", "ja": "アリ"},
    # --- body ---
    {"concept": "head", "category": "body", "en": "head", "fr": "tête", "de": "Kopf", "es": "cabeza", "ru": "голова", "zh": "头", "ja": "頭"},
    {"concept": "eye", "category": "body", "en": "eye", "fr": "œil", "de": "Auge", "es": "ojo", "ru": "глаз", "zh": "眼睛", "ja": "目"},
    {"concept": "ear", "category": "body", "en": "ear", "fr": "oreille", "de": "Ohr", "es": "oreja", "ru": "ухо", "zh": "耳朵", "ja": "耳"},
    {"concept": "nose", "category": "body", "en": "nose", "fr": "nez", "de": "Nase", "es": "nariz", "ru": "нос", "zh": "鼻子", "ja": "鼻"},
    {"concept": "mouth", "category": "body", "en": "mouth", "fr": "bouche", "de": "Mund", "es": "boca", "ru": "рот", "zh": "嘴", "ja": "口"},
    {"concept": "tooth", "category": "body", "en": "tooth", "fr": "dent", "de": "Zahn", "es": "diente", "ru": "зуб", "zh": "牙齿", "ja": "歯"},
    {"concept": "heart", "category": "body", "en": "heart", "fr": "cœur", "de": "Herz", "es": "corazón", "ru": "сердце", "zh": "心脏", "ja": "心臓"},
    {"concept": "leg", "category": "body", "en": "leg", "fr": "jambe", "de": "Bein", "es": "pierna", "ru": "нога", "zh": "腿", "ja": "足"},
    {"concept": "hair", "category": "body", "en": "hair", "fr": "cheveux", "de": "Haar", "es": "pelo", "ru": "волосы", "zh": "头发", "ja": "髪"},
    {"concept": "face", "category": "body", "en": "face", "fr": "visage", "de": "Gesicht", "es": "cara", "ru": "лицо", "zh": "脸", "ja": "顔"},
    {"concept": "blood", "category": "body", "en": "blood", "fr": "sang", "de": "Blut", "es": "sangre", "ru": "кровь", "zh": "血", "ja": "血"},
    {"concept": "bone", "category": "body", "en": "bone", "fr": "os", "de": "Knochen", "es": "hueso", "ru": "кость", "zh": "骨头", "ja": "骨"},
    {"concept": "skin", "category": "body", "en": "skin", "fr": "peau", "de": "Haut", "es": "piel", "ru": "кожа", "zh": "皮肤", "ja": "肌"},
    {"concept": "neck", "category": "body", "en": "neck", "fr": "cou", "de": "Hals", "es": "cuello", "ru": "шея", "zh": "脖子", "ja": "首"},
    {"concept": "shoulder", "category": "body", "en": "shoulder", "fr": "épaule", "de": "Schulter", "es": "hombro", "ru": "плечо", "zh": "肩膀", "ja": "肩"},
    {"concept": "knee", "category": "body", "en": "knee", "fr": "genou", "de": "Knie", "es": "rodilla", "ru": "колено", "zh": "膝盖", "ja": "膝"},
    # --- nature ---
    {"concept": "water", "category": "nature", "en": "water", "fr": "eau", "de": "Wasser", "es": "agua", "ru": "вода", "zh": "水", "ja": "水"},
    {"concept": "fire", "category": "nature", "en": "fire", "fr": "feu", "de": "Feuer", "es": "fuego", "ru": "огонь", "zh": "火", "ja": "火"},
    {"concept": "sun", "category": "nature", "en": "sun", "fr": "soleil", "de": "Sonne", "es": "sol", "ru": "солнце", "zh": "太阳", "ja": "太陽"},
    {"concept": "moon", "category": "nature", "en": "moon", "fr": "lune", "de": "Mond", "es": "luna", "ru": "луна", "zh": "月亮", "ja": "月"},
    {"concept": "star", "category": "nature", "en": "star", "fr": "étoile", "de": "Stern", "es": "estrella", "ru": "звезда", "zh": "星星", "ja": "星"},
    {"concept": "tree", "category": "nature", "en": "tree", "fr": "arbre", "de": "Baum", "es": "árbol", "ru": "дерево", "zh": "树", "ja": "木"},
    {"concept": "flower", "category": "nature", "en": "flower", "fr": "fleur", "de": "Blume", "es": "flor", "ru": "цветок", "zh": "花", "ja": "花"},
    {"concept": "river", "category": "nature", "en": "river", "fr": "rivière", "de": "Fluss", "es": "río", "ru": "река", "zh": "河", "ja": "川"},
    {"concept": "mountain", "category": "nature", "en": "mountain", "fr": "montagne", "de": "Berg", "es": "montaña", "ru": "гора", "zh": "山", "ja": "山"},
    {"concept": "sea", "category": "nature", "en": "sea", "fr": "mer", "de": "Meer", "es": "mar", "ru": "море", "zh": "海", "ja": "海"},
    {"concept": "rain", "category": "nature", "en": "rain", "fr": "pluie", "de": "Regen", "es": "lluvia", "ru": "дождь", "zh": "雨", "ja": "雨"},
    {"concept": "snow", "category": "nature", "en": "snow", "fr": "neige", "de": "Schnee", "es": "nieve", "ru": "снег", "zh": "雪", "ja": "雪"},
    {"concept": "sky", "category": "nature", "en": "sky", "fr": "ciel", "de": "Himmel", "es": "cielo", "ru": "небо", "zh": "天空", "ja": "空"},
    {"concept": "stone", "category": "nature", "en": "stone", "fr": "pierre", "de": "Stein", "es": "piedra", "ru": "камень", "zh": "石头", "ja": "石"},
    {"concept": "cloud", "category": "nature", "en": "cloud", "fr": "nuage", "de": "Wolke", "es": "nube", "ru": "облако", "zh": "云", "ja": "雲"},
    {"concept": "forest", "category": "nature", "en": "forest", "fr": "forêt", "de": "Wald", "es": "bosque", "ru": "лес", "zh": "森林", "ja": "森"},
    {"concept": "ice", "category": "nature", "en": "ice", "fr": "glace", "de": "Eis", "es": "hielo", "ru": "лёд", "zh": "冰", "ja": "氷"},
    {"concept": "lake", "category": "nature", "en": "lake", "fr": "lac", "de": "See", "es": "lago", "ru": "озеро", "zh": "湖", "ja": "湖"},
    {"concept": "island", "category": "nature", "en": "island", "fr": "île", "de": "Insel", "es": "isla", "ru": "остров", "zh": "岛", "ja": "島"},
    {"concept": "leaf", "category": "nature", "en": "leaf", "fr": "feuille", "de": "Blatt", "es": "hoja", "ru": "лист", "zh": "叶子", "ja": "葉"},
    {"concept": "grass", "category": "nature", "en": "grass", "fr": "herbe", "de": "Gras", "es": "hierba", "ru": "трава", "zh": "草", "ja": "草"},
    # --- food ---
    {"concept": "bread", "category": "food", "en": "bread", "fr": "pain", "de": "Brot", "es": "pan", "ru": "хлеб", "zh": "面包", "ja": "パン"},
    {"concept": "apple", "category": "food", "en": "apple", "fr": "pomme", "de": "Apfel", "es": "manzana", "ru": "яблоко", "zh": "苹果", "ja": "りんご"},
    {"concept": "milk", "category": "food", "en": "milk", "fr": "lait", "de": "Milch", "es": "leche", "ru": "молоко", "zh": "牛奶", "ja": "牛乳"},
    {"concept": "egg", "category": "food", "en": "egg", "fr": "œuf", "de": "Ei", "es": "huevo", "ru": "яйцо", "zh": "鸡蛋", "ja": "卵"},
    {"concept": "cheese", "category": "food", "en": "cheese", "fr": "fromage", "de": "Käse", "es": "queso", "ru": "сыр", "zh": "奶酪", "ja": "チーズ"},
    {"concept": "meat", "category": "food", "en": "meat", "fr": "viande", "de": "Fleisch", "es": "carne", "ru": "мясо", "zh": "肉", "ja": "肉"},
    {"concept": "salt", "category": "food", "en": "salt", "fr": "sel", "de": "Salz", "es": "sal", "ru": "соль", "zh": "盐", "ja": "塩"},
    {"concept": "sugar", "category": "food", "en": "sugar", "fr": "sucre", "de": "Zucker", "es": "azúcar", "ru": "сахар", "zh": "糖", "ja": "砂糖"},
    {"concept": "rice", "category": "food", "en": "rice", "fr": "riz", "de": "Reis", "es": "arroz", "ru": "рис", "zh": "米", "ja": "米"},
    {"concept": "wine", "category": "food", "en": "wine", "fr": "vin", "de": "Wein", "es": "vino", "ru": "вино", "zh": "葡萄酒", "ja": "ワイン"},
    {"concept": "tea", "category": "food", "en": "tea", "fr": "thé", "de": "Tee", "es": "té", "ru": "чай", "zh": "茶", "ja": "お茶"},
    {"concept": "soup", "category": "food", "en": "soup", "fr": "soupe", "de": "Suppe", "es": "sopa", "ru": "суп", "zh": "汤", "ja": "スープ"},
    {"concept": "grape", "category": "food", "en": "grape", "fr": "raisin", "de": "Traube", "es": "uva", "ru": "виноград", "zh": "葡萄", "ja": "ぶどう"},
    {"concept": "pear", "category": "food", "en": "pear", "fr": "poire", "de": "Birne", "es": "pera", "ru": "груша", "zh": "梨", "ja": "梨"},
    {"concept": "carrot", "category": "food", "en": "carrot", "fr": "carotte", "de": "Karotte", "es": "zanahoria", "ru": "морковь", "zh": "胡萝卜", "ja": "にんじん"},
    {"concept": "cake", "category": "food", "en": "cake", "fr": "gâteau", "de": "Kuchen", "es": "pastel", "ru": "торт", "zh": "蛋糕", "ja": "ケーキ"},
    {"concept": "onion", "category": "food", "en": "onion", "fr": "oignon", "de": "Zwiebel", "es": "cebolla", "ru": "лук", "zh": "洋葱", "ja": "玉ねぎ"},
    {"concept": "lemon", "category": "food", "en": "lemon", "fr": "citron", "de": "Zitrone", "es": "limón", "ru": "лимон", "zh": "柠檬", "ja": "レモン"},
    {"concept": "cherry", "category": "food", "en": "cherry", "fr": "cerise", "de": "Kirsche", "es": "cereza", "ru": "вишня", "zh": "樱桃", "ja": "さくらんぼ"},
    {"concept": "strawberry", "category": "food", "en": "strawberry", "fr": "fraise", "de": "Erdbeere", "es": "fresa", "ru": "клубника", "zh": "草莓", "ja": "いちご"},
    # --- objects ---
    {"concept": "book", "category": "object", "en": "book", "fr": "livre", "de": "Buch", "es": "libro", "ru": "книга", "zh": "书", "ja": "本"},
    {"concept": "door", "category": "object", "en": "door", "fr": "porte", "de": "Tür", "es": "puerta", "ru": "дверь", "zh": "门", "ja": "ドア"},
    {"concept": "house", "category": "object", "en": "house", "fr": "maison", "de": "Haus", "es": "casa", "ru": "дом", "zh": "房子", "ja": "家"},
    {"concept": "key", "category": "object", "en": "key", "fr": "clé", "de": "Schlüssel", "es": "llave", "ru": "ключ", "zh": "钥匙", "ja": "鍵"},
    {"concept": "chair", "category": "object", "en": "chair", "fr": "chaise", "de": "Stuhl", "es": "silla", "ru": "стул", "zh": "椅子", "ja": "椅子"},
    {"concept": "window", "category": "object", "en": "window", "fr": "fenêtre", "de": "Fenster", "es": "ventana", "ru": "окно", "zh": "窗户", "ja": "窓"},
    {"concept": "bed", "category": "object", "en": "bed", "fr": "lit", "de": "Bett", "es": "cama", "ru": "кровать", "zh": "床", "ja": "ベッド"},
    {"concept": "knife", "category": "object", "en": "knife", "fr": "couteau", "de": "Messer", "es": "cuchillo", "ru": "нож", "zh": "刀", "ja": "ナイフ"},
    {"concept": "spoon", "category": "object", "en": "spoon", "fr": "cuillère", "de": "Löffel", "es": "cuchara", "ru": "ложка", "zh": "勺子", "ja": "スプーン"},
    {"concept": "fork", "category": "object", "en": "fork", "fr": "fourchette", "de": "Gabel", "es": "tenedor", "ru": "вилка", "zh": "叉子", "ja": "フォーク"},
    {"concept": "hat", "category": "object", "en": "hat", "fr": "chapeau", "de": "Hut", "es": "sombrero", "ru": "шляпа", "zh": "帽子", "ja": "帽子"},
    {"concept": "clock", "category": "object", "en": "clock", "fr": "horloge", "de": "Uhr", "es": "reloj", "ru": "часы", "zh": "时钟", "ja": "時計"},
    {"concept": "car", "category": "object", "en": "car", "fr": "voiture", "de": "Auto", "es": "coche", "ru": "машина", "zh": "汽车", "ja": "車"},
    {"concept": "boat", "category": "object", "en": "boat", "fr": "bateau", "de": "Boot", "es": "barco", "ru": "лодка", "zh": "船", "ja": "船"},
    {"concept": "pencil", "category": "object", "en": "pencil", "fr": "crayon", "de": "Bleistift", "es": "lápiz", "ru": "карандаш", "zh": "铅笔", "ja": "鉛筆"},
    {"concept": "box", "category": "object", "en": "box", "fr": "boîte", "de": "Kiste", "es": "caja", "ru": "коробка", "zh": "盒子", "ja": "箱"},
    {"concept": "bottle", "category": "object", "en": "bottle", "fr": "bouteille", "de": "Flasche", "es": "botella", "ru": "бутылка", "zh": "瓶子", "ja": "瓶"},
    {"concept": "mirror", "category": "object", "en": "mirror", "fr": "miroir", "de": "Spiegel", "es": "espejo", "ru": "зеркало", "zh": "镜子", "ja": "鏡"},
    {"concept": "candle", "category": "object", "en": "candle", "fr": "bougie", "de": "Kerze", "es": "vela", "ru": "свеча", "zh": "蜡烛", "ja": "ろうそく"},
    {"concept": "money", "category": "object", "en": "money", "fr": "argent", "de": "Geld", "es": "dinero", "ru": "деньги", "zh": "钱", "ja": "お金"},
    {"concept": "wall", "category": "object", "en": "wall", "fr": "mur", "de": "Wand", "es": "pared", "ru": "стена", "zh": "墙", "ja": "壁"},
    {"concept": "shirt", "category": "object", "en": "shirt", "fr": "chemise", "de": "Hemd", "es": "camisa", "ru": "рубашка", "zh": "衬衫", "ja": "シャツ"},
    {"concept": "bicycle", "category": "object", "en": "bicycle", "fr": "vélo", "de": "Fahrrad", "es": "bicicleta", "ru": "велосипед", "zh": "自行车", "ja": "自転車"},
    {"concept": "umbrella", "category": "object", "en": "umbrella", "fr": "parapluie", "de": "Regenschirm", "es": "paraguas", "ru": "зонт", "zh": "雨伞", "ja": "傘"},
    {"concept": "roof", "category": "object", "en": "roof", "fr": "toit", "de": "Dach", "es": "tejado", "ru": "крыша", "zh": "屋顶", "ja": "屋根"},
    # --- places ---
    {"concept": "city", "category": "place", "en": "city", "fr": "ville", "de": "Stadt", "es": "ciudad", "ru": "город", "zh": "城市", "ja": "都市"},
    {"concept": "school", "category": "place", "en": "school", "fr": "école", "de": "Schule", "es": "escuela", "ru": "школа", "zh": "学校", "ja": "学校"},
    {"concept": "church", "category": "place", "en": "church", "fr": "église", "de": "Kirche", "es": "iglesia", "ru": "церковь", "zh": "教堂", "ja": "教会"},
    {"concept": "street", "category": "place", "en": "street", "fr": "rue", "de": "Straße", "es": "calle", "ru": "улица", "zh": "街道", "ja": "通り"},
    {"concept": "market", "category": "place", "en": "market", "fr": "marché", "de": "Markt", "es": "mercado", "ru": "рынок", "zh": "市场", "ja": "市場"},
    {"concept": "kitchen", "category": "place", "en": "kitchen", "fr": "cuisine", "de": "Küche", "es": "cocina", "ru": "кухня", "zh": "厨房", "ja": "台所"},
    {"concept": "room", "category": "place", "en": "room", "fr": "pièce", "de": "Zimmer", "es": "habitación", "ru": "комната", "zh": "房间", "ja": "部屋"},
    {"concept": "country", "category": "place", "en": "country", "fr": "pays", "de": "Land", "es": "país", "ru": "страна", "zh": "国家", "ja": "国"},
    {"concept": "world", "category": "place", "en": "world", "fr": "monde", "de": "Welt", "es": "mundo", "ru": "мир", "zh": "世界", "ja": "世界"},
    {"concept": "farm", "category": "place", "en": "farm", "fr": "ferme", "de": "Bauernhof", "es": "granja", "ru": "ферма", "zh": "农场", "ja": "農場"},
    {"concept": "library", "category": "place", "en": "library", "fr": "bibliothèque", "de": "Bibliothek", "es": "biblioteca", "ru": "библиотека", "zh": "图书馆", "ja": "図書館"},
    {"concept": "shop", "category": "place", "en": "shop", "fr": "magasin", "de": "Laden", "es": "tienda", "ru": "магазин", "zh": "商店", "ja": "店"},
    {"concept": "beach", "category": "place", "en": "beach", "fr": "plage", "de": "Strand", "es": "playa", "ru": "пляж", "zh": "海滩", "ja": "浜辺"},
    {"concept": "castle", "category": "place", "en": "castle", "fr": "château", "de": "Burg", "es": "castillo", "ru": "замок", "zh": "城堡", "ja": "城"},
    {"concept": "airport", "category": "place", "en": "airport", "fr": "aéroport", "de": "Flughafen", "es": "aeropuerto", "ru": "аэропорт", "zh": "机场", "ja": "空港"},
    {"concept": "bridge", "category": "place", "en": "bridge", "fr": "pont", "de": "Brücke", "es": "puente", "ru": "мост", "zh": "桥", "ja": "橋"},
    # --- people ---
    {"concept": "mother", "category": "person", "en": "mother", "fr": "mère", "de": "Mutter", "es": "madre", "ru": "мать", "zh": "母亲", "ja": "母"},
    {"concept": "father", "category": "person", "en": "father", "fr": "père", "de": "Vater", "es": "padre", "ru": "отец", "zh": "父亲", "ja": "父"},
    {"concept": "child", "category": "person", "en": "child", "fr": "enfant", "de": "Kind", "es": "niño", "ru": "ребёнок", "zh": "孩子", "ja": "子供"},
    {"concept": "friend", "category": "person", "en": "friend", "fr": "ami", "de": "Freund", "es": "amigo", "ru": "друг", "zh": "朋友", "ja": "友達"},
    {"concept": "king", "category": "person", "en": "king", "fr": "roi", "de": "König", "es": "rey", "ru": "король", "zh": "国王", "ja": "王"},
    {"concept": "queen", "category": "person", "en": "queen", "fr": "reine", "de": "Königin", "es": "reina", "ru": "королева", "zh": "女王", "ja": "女王"},
    {"concept": "man", "category": "person", "en": "man", "fr": "homme", "de": "Mann", "es": "hombre", "ru": "мужчина", "zh": "男人", "ja": "男"},
    {"concept": "woman", "category": "person", "en": "woman", "fr": "femme", "de": "Frau", "es": "mujer", "ru": "женщина", "zh": "女人", "ja": "女"},
    {"concept": "brother", "category": "person", "en": "brother", "fr": "frère", "de": "Bruder", "es": "hermano", "ru": "брат", "zh": "兄弟", "ja": "兄弟"},
    {"concept": "sister", "category": "person", "en": "sister", "fr": "sœur", "de": "Schwester", "es": "hermana", "ru": "сестра", "zh": "姐妹", "ja": "姉妹"},
    {"concept": "son", "category": "person", "en": "son", "fr": "fils", "de": "Sohn", "es": "hijo", "ru": "сын", "zh": "儿子", "ja": "息子"},
    {"concept": "daughter", "category": "person", "en": "daughter", "fr": "fille", "de": "Tochter", "es": "hija", "ru": "дочь", "zh": "女儿", "ja": "娘"},
    {"concept": "teacher", "category": "person", "en": "teacher", "fr": "professeur", "de": "Lehrer", "es": "profesor", "ru": "учитель", "zh": "老师", "ja": "先生"},
    {"concept": "doctor", "category": "person", "en": "doctor", "fr": "médecin", "de": "Arzt", "es": "médico", "ru": "врач", "zh": "医生", "ja": "医者"},
    {"concept": "boy", "category": "person", "en": "boy", "fr": "garçon", "de": "Junge", "es": "chico", "ru": "мальчик", "zh": "男孩", "ja": "男の子"},
    {"concept": "girl", "category": "person", "en": "girl", "fr": "fille", "de": "Mädchen", "es": "chica", "ru": "девочка", "zh": "女孩", "ja": "女の子"},
    {"concept": "neighbor", "category": "person", "en": "neighbor", "fr": "voisin", "de": "Nachbar", "es": "vecino", "ru": "сосед", "zh": "邻居", "ja": "隣人"},
    # --- abstract ---
    {"concept": "love", "category": "abstract", "en": "love", "fr": "amour", "de": "Liebe", "es": "amor", "ru": "любовь", "zh": "爱", "ja": "愛"},
    {"concept": "time", "category": "abstract", "en": "time", "fr": "temps", "de": "Zeit", "es": "tiempo", "ru": "время", "zh": "时间", "ja": "時間"},
    {"concept": "life", "category": "abstract", "en": "life", "fr": "vie", "de": "Leben", "es": "vida", "ru": "жизнь", "zh": "生命", "ja": "命"},
    {"concept": "death", "category": "abstract", "en": "death", "fr": "mort", "de": "Tod", "es": "muerte", "ru": "смерть", "zh": "死亡", "ja": "死"},
    {"concept": "peace", "category": "abstract", "en": "peace", "fr": "paix", "de": "Frieden", "es": "paz", "ru": "мир", "zh": "和平", "ja": "平和"},
    {"concept": "war", "category": "abstract", "en": "war", "fr": "guerre", "de": "Krieg", "es": "guerra", "ru": "война", "zh": "战争", "ja": "戦争"},
    {"concept": "truth", "category": "abstract", "en": "truth", "fr": "vérité", "de": "Wahrheit", "es": "verdad", "ru": "правда", "zh": "真理", "ja": "真実"},
    {"concept": "hope", "category": "abstract", "en": "hope", "fr": "espoir", "de": "Hoffnung", "es": "esperanza", "ru": "надежда", "zh": "希望", "ja": "希望"},
    {"concept": "fear", "category": "abstract", "en": "fear", "fr": "peur", "de": "Angst", "es": "miedo", "ru": "страх", "zh": "恐惧", "ja": "恐怖"},
    {"concept": "dream", "category": "abstract", "en": "dream", "fr": "rêve", "de": "Traum", "es": "sueño", "ru": "сон", "zh": "梦", "ja": "夢"},
    {"concept": "freedom", "category": "abstract", "en": "freedom", "fr": "liberté", "de": "Freiheit", "es": "libertad", "ru": "свобода", "zh": "自由", "ja": "自由"},
    {"concept": "word", "category": "abstract", "en": "word", "fr": "mot", "de": "Wort", "es": "palabra", "ru": "слово", "zh": "词", "ja": "言葉"},
    {"concept": "language", "category": "abstract", "en": "language", "fr": "langue", "de": "Sprache", "es": "idioma", "ru": "язык", "zh": "语言", "ja": "言語"},
    {"concept": "music", "category": "abstract", "en": "music", "fr": "musique", "de": "Musik", "es": "música", "ru": "музыка", "zh": "音乐", "ja": "音楽"},
    {"concept": "joy", "category": "abstract", "en": "joy", "fr": "joie", "de": "Freude", "es": "alegría", "ru": "радость", "zh": "快乐", "ja": "喜び"},
    {"concept": "anger", "category": "abstract", "en": "anger", "fr": "colère", "de": "Wut", "es": "ira", "ru": "гнев", "zh": "愤怒", "ja": "怒り"},
    {"concept": "beauty", "category": "abstract", "en": "beauty", "fr": "beauté", "de": "Schönheit", "es": "belleza", "ru": "красота", "zh": "美", "ja": "美しさ"},
    {"concept": "answer", "category": "abstract", "en": "answer", "fr": "réponse", "de": "Antwort", "es": "respuesta", "ru": "ответ", "zh": "答案", "ja": "答え"},
    {"concept": "game", "category": "abstract", "en": "game", "fr": "jeu", "de": "Spiel", "es": "juego", "ru": "игра", "zh": "游戏", "ja": "ゲーム"},
    {"concept": "work", "category": "abstract", "en": "work", "fr": "travail", "de": "Arbeit", "es": "trabajo", "ru": "работа", "zh": "工作", "ja": "仕事"},
    {"concept": "health", "category": "abstract", "en": "health", "fr": "santé", "de": "Gesundheit", "es": "salud", "ru": "здоровье", "zh": "健康", "ja": "健康"},
    {"concept": "happiness", "category": "abstract", "en": "happiness", "fr": "bonheur", "de": "Glück", "es": "felicidad", "ru": "счастье", "zh": "幸福", "ja": "幸せ"},
    # --- colours ---
    {"concept": "red", "category": "color", "en": "red", "fr": "rouge", "de": "rot", "es": "rojo", "ru": "красный", "zh": "红色", "ja": "赤"},
    {"concept": "green", "category": "color", "en": "green", "fr": "vert", "de": "grün", "es": "verde", "ru": "зелёный", "zh": "绿色", "ja": "緑"},
    {"concept": "blue", "category": "color", "en": "blue", "fr": "bleu", "de": "blau", "es": "azul", "ru": "синий", "zh": "蓝色", "ja": "青"},
    {"concept": "yellow", "category": "color", "en": "yellow", "fr": "jaune", "de": "gelb", "es": "amarillo", "ru": "жёлтый", "zh": "黄色", "ja": "黄色"},
    {"concept": "black", "category": "color", "en": "black", "fr": "noir", "de": "schwarz", "es": "negro", "ru": "чёрный", "zh": "黑色", "ja": "黒"},
    {"concept": "white", "category": "color", "en": "white", "fr": "blanc", "de": "weiß", "es": "blanco", "ru": "белый", "zh": "白色", "ja": "白"},
    {"concept": "brown", "category": "color", "en": "brown", "fr": "marron", "de": "braun", "es": "marrón", "ru": "коричневый", "zh": "棕色", "ja": "茶色"},
    {"concept": "purple", "category": "color", "en": "purple", "fr": "violet", "de": "lila", "es": "morado", "ru": "фиолетовый", "zh": "紫色", "ja": "紫"},
    # --- time ---
    {"concept": "day", "category": "time", "en": "day", "fr": "jour", "de": "Tag", "es": "día", "ru": "день", "zh": "天", "ja": "日"},
    {"concept": "night", "category": "time", "en": "night", "fr": "nuit", "de": "Nacht", "es": "noche", "ru": "ночь", "zh": "夜晚", "ja": "夜"},
    {"concept": "morning", "category": "time", "en": "morning", "fr": "matin", "de": "Morgen", "es": "mañana", "ru": "утро", "zh": "早上", "ja": "朝"},
    {"concept": "evening", "category": "time", "en": "evening", "fr": "soir", "de": "Abend", "es": "tarde", "ru": "вечер", "zh": "晚上", "ja": "夕方"},
    {"concept": "week", "category": "time", "en": "week", "fr": "semaine", "de": "Woche", "es": "semana", "ru": "неделя", "zh": "星期", "ja": "週"},
    {"concept": "month", "category": "time", "en": "month", "fr": "mois", "de": "Monat", "es": "mes", "ru": "месяц", "zh": "月", "ja": "月"},
    {"concept": "year", "category": "time", "en": "year", "fr": "année", "de": "Jahr", "es": "año", "ru": "год", "zh": "年", "ja": "年"},
    {"concept": "hour", "category": "time", "en": "hour", "fr": "heure", "de": "Stunde", "es": "hora", "ru": "час", "zh": "小时", "ja": "時間"},
    {"concept": "today", "category": "time", "en": "today", "fr": "aujourd'hui", "de": "heute", "es": "hoy", "ru": "сегодня", "zh": "今天", "ja": "今日"},
    {"concept": "tomorrow", "category": "time", "en": "tomorrow", "fr": "demain", "de": "morgen", "es": "mañana", "ru": "завтра", "zh": "明天", "ja": "明日"},
    {"concept": "yesterday", "category": "time", "en": "yesterday", "fr": "hier", "de": "gestern", "es": "ayer", "ru": "вчера", "zh": "昨天", "ja": "昨日"},
    {"concept": "spring", "category": "time", "en": "spring", "fr": "printemps", "de": "Frühling", "es": "primavera", "ru": "весна", "zh": "春天", "ja": "春"},
    {"concept": "summer", "category": "time", "en": "summer", "fr": "été", "de": "Sommer", "es": "verano", "ru": "лето", "zh": "夏天", "ja": "夏"},
    {"concept": "autumn", "category": "time", "en": "autumn", "fr": "automne", "de": "Herbst", "es": "otoño", "ru": "осень", "zh": "秋天", "ja": "秋"},
    # --- numbers (the words one..twenty are in NUMBERS) ---
    {"concept": "hundred", "category": "number", "en": "hundred", "fr": "cent", "de": "hundert", "es": "cien", "ru": "сто", "zh": "百", "ja": "百"},
    {"concept": "thousand", "category": "number", "en": "thousand", "fr": "mille", "de": "tausend", "es": "mil", "ru": "тысяча", "zh": "千", "ja": "千"},
    {"concept": "half", "category": "number", "en": "half", "fr": "moitié", "de": "Hälfte", "es": "mitad", "ru": "половина", "zh": "一半", "ja": "半分"},
    # --- actions (infinitives) ---
    {"concept": "eat", "category": "action", "en": "eat", "fr": "manger", "de": "essen", "es": "comer", "ru": "есть", "zh": "吃", "ja": "食べる"},
    {"concept": "drink", "category": "action", "en": "drink", "fr": "boire", "de": "trinken", "es": "beber", "ru": "пить", "zh": "喝", "ja": "飲む"},
    {"concept": "run", "category": "action", "en": "run", "fr": "courir", "de": "rennen", "es": "correr", "ru": "бежать", "zh": "跑", "ja": "走る"},
    {"concept": "go", "category": "action", "en": "go", "fr": "aller", "de": "gehen", "es": "ir", "ru": "идти", "zh": "去", "ja": "行く"},
    {"concept": "speak", "category": "action", "en": "speak", "fr": "parler", "de": "sprechen", "es": "hablar", "ru": "говорить", "zh": "说", "ja": "話す"},
    {"concept": "read", "category": "action", "en": "read", "fr": "lire", "de": "lesen", "es": "leer", "ru": "читать", "zh": "读", "ja": "読む"},
    {"concept": "write", "category": "action", "en": "write", "fr": "écrire", "de": "schreiben", "es": "escribir", "ru": "писать", "zh": "写", "ja": "書く"},
    {"concept": "see", "category": "action", "en": "see", "fr": "voir", "de": "sehen", "es": "ver", "ru": "видеть", "zh": "看", "ja": "見る"},
    {"concept": "hear", "category": "action", "en": "hear", "fr": "entendre", "de": "hören", "es": "oír", "ru": "слышать", "zh": "听", "ja": "聞く"},
    {"concept": "sing", "category": "action", "en": "sing", "fr": "chanter", "de": "singen", "es": "cantar", "ru": "петь", "zh": "唱歌", "ja": "歌う"},
    {"concept": "swim", "category": "action", "en": "swim", "fr": "nager", "de": "schwimmen", "es": "nadar", "ru": "плавать", "zh": "游泳", "ja": "泳ぐ"},
    {"concept": "fly", "category": "action", "en": "fly", "fr": "voler", "de": "fliegen", "es": "volar", "ru": "летать", "zh": "飞", "ja": "飛ぶ"},
    {"concept": "give", "category": "action", "en": "give", "fr": "donner", "de": "geben", "es": "dar", "ru": "давать", "zh": "给", "ja": "あげる"},
    {"concept": "buy", "category": "action", "en": "buy", "fr": "acheter", "de": "kaufen", "es": "comprar", "ru": "покупать", "zh": "买", "ja": "買う"},
    {"concept": "open", "category": "action", "en": "open", "fr": "ouvrir", "de": "öffnen", "es": "abrir", "ru": "открывать", "zh": "打开", "ja": "開ける"},
    {"concept": "close", "category": "action", "en": "close", "fr": "fermer", "de": "schließen", "es": "cerrar", "ru": "закрывать", "zh": "关", "ja": "閉める"},
    {"concept": "think", "category": "action", "en": "think", "fr": "penser", "de": "denken", "es": "pensar", "ru": "думать", "zh": "想", "ja": "考える"},
    {"concept": "laugh", "category": "action", "en": "laugh", "fr": "rire", "de": "lachen", "es": "reír", "ru": "смеяться", "zh": "笑", "ja": "笑う"},
    {"concept": "cry", "category": "action", "en": "cry", "fr": "pleurer", "de": "weinen", "es": "llorar", "ru": "плакать", "zh": "哭", "ja": "泣く"},
    {"concept": "learn", "category": "action", "en": "learn", "fr": "apprendre", "de": "lernen", "es": "aprender", "ru": "учиться", "zh": "学习", "ja": "学ぶ"},
    {"concept": "cook", "category": "action", "en": "cook", "fr": "cuisiner", "de": "kochen", "es": "cocinar", "ru": "готовить", "zh": "做饭", "ja": "料理する"},
    {"concept": "know", "category": "action", "en": "know", "fr": "savoir", "de": "wissen", "es": "saber", "ru": "знать", "zh": "知道", "ja": "知る"},
    {"concept": "jump", "category": "action", "en": "jump", "fr": "sauter", "de": "springen", "es": "saltar", "ru": "прыгать", "zh": "跳", "ja": "跳ぶ"},
    {"concept": "dance", "category": "action", "en": "dance", "fr": "danser", "de": "tanzen", "es": "bailar", "ru": "танцевать", "zh": "跳舞", "ja": "踊る"},
]

DAYS: dict[str, list[str]] = {
    "en": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "fr": ["lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"],
    "de": ["Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"],
    "es": ["lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"],
    "ru": ["понедельник", "вторник", "среда", "четверг", "пятница", "суббота", "воскресенье"],
    "zh": ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"],
    "ja": ["月曜日", "火曜日", "水曜日", "木曜日", "金曜日", "土曜日", "日曜日"],
}

MONTHS: dict[str, list[str]] = {
    "en": ["January", "February", "March", "April", "May", "June",
           "July", "August", "September", "October", "November", "December"],
    "fr": ["janvier", "février", "mars", "avril", "mai", "juin",
           "juillet", "août", "septembre", "octobre", "novembre", "décembre"],
    "de": ["Januar", "Februar", "März", "April", "Mai", "Juni",
           "Juli", "August", "September", "Oktober", "November", "Dezember"],
    "es": ["enero", "febrero", "marzo", "abril", "mayo", "junio",
           "julio", "agosto", "septiembre", "octubre", "noviembre", "diciembre"],
    "ru": ["январь", "февраль", "март", "апрель", "май", "июнь",
           "июль", "август", "сентябрь", "октябрь", "ноябрь", "декабрь"],
    "zh": ["一月", "二月", "三月", "四月", "五月", "六月",
           "七月", "八月", "九月", "十月", "十一月", "十二月"],
    "ja": ["一月", "二月", "三月", "四月", "五月", "六月",
           "七月", "八月", "九月", "十月", "十一月", "十二月"],
}

NUMBERS: dict[str, list[str]] = {
    "en": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
           "eighteen", "nineteen", "twenty"],
    "fr": ["un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix",
           "onze", "douze", "treize", "quatorze", "quinze", "seize", "dix-sept",
           "dix-huit", "dix-neuf", "vingt"],
    "de": ["eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun", "zehn",
           "elf", "zwölf", "dreizehn", "vierzehn", "fünfzehn", "sechzehn", "siebzehn",
           "achtzehn", "neunzehn", "zwanzig"],
    "es": ["uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve", "diez",
           "once", "doce", "trece", "catorce", "quince", "dieciséis", "diecisiete",
           "dieciocho", "diecinueve", "veinte"],
    "ru": ["один", "два", "три", "четыре", "пять", "шесть", "семь", "восемь", "девять", "десять",
           "одиннадцать", "двенадцать", "тринадцать", "четырнадцать", "пятнадцать",
           "шестнадцать", "семнадцать", "восемнадцать", "девятнадцать", "двадцать"],
    "zh": ["一", "二", "三", "四", "五", "六", "七", "八", "九", "十",
           "十一", "十二", "十三", "十四", "十五", "十六", "十七", "十八", "十九", "二十"],
    "ja": ["一", "二", "三", "四", "五", "六", "七", "八", "九", "十",
           "十一", "十二", "十三", "十四", "十五", "十六", "十七", "十八", "十九", "二十"],
}

COUNTRIES: list[dict] = [
    # Europe
    {"country": "France", "capital": "Paris", "continent": "Europe"},
    {"country": "Germany", "capital": "Berlin", "continent": "Europe"},
    {"country": "Spain", "capital": "Madrid", "continent": "Europe"},
    {"country": "Italy", "capital": "Rome", "continent": "Europe"},
    {"country": "United Kingdom", "capital": "London", "continent": "Europe"},
    {"country": "Portugal", "capital": "Lisbon", "continent": "Europe"},
    {"country": "Netherlands", "capital": "Amsterdam", "continent": "Europe"},
    {"country": "Belgium", "capital": "Brussels", "continent": "Europe"},
    {"country": "Poland", "capital": "Warsaw", "continent": "Europe"},
    {"country": "Sweden", "capital": "Stockholm", "continent": "Europe"},
    {"country": "Norway", "capital": "Oslo", "continent": "Europe"},
    {"country": "Finland", "capital": "Helsinki", "continent": "Europe"},
    {"country": "Denmark", "capital": "Copenhagen", "continent": "Europe"},
    {"country": "Ireland", "capital": "Dublin", "continent": "Europe"},
    {"country": "Greece", "capital": "Athens", "continent": "Europe"},
    {"country": "Austria", "capital": "Vienna", "continent": "Europe"},
    {"country": "Switzerland", "capital": "Bern", "continent": "Europe"},
    {"country": "Hungary", "capital": "Budapest", "continent": "Europe"},
    {"country": "Czech Republic", "capital": "Prague", "continent": "Europe"},
    {"country": "Russia", "capital": "Moscow", "continent": "Europe"},
    # Asia
    {"country": "Japan", "capital": "Tokyo", "continent": "Asia"},
    {"country": "China", "capital": "Beijing", "continent": "Asia"},
    {"country": "India", "capital": "New Delhi", "continent": "Asia"},
    {"country": "South Korea", "capital": "Seoul", "continent": "Asia"},
    {"country": "Thailand", "capital": "Bangkok", "continent": "Asia"},
    {"country": "Vietnam", "capital": "Hanoi", "continent": "Asia"},
    {"country": "Indonesia", "capital": "Jakarta", "continent": "Asia"},
    {"country": "Philippines", "capital": "Manila", "continent": "Asia"},
    {"country": "Pakistan", "capital": "Islamabad", "continent": "Asia"},
    {"country": "Iran", "capital": "Tehran", "continent": "Asia"},
    {"country": "Saudi Arabia", "capital": "Riyadh", "continent": "Asia"},
    {"country": "Turkey", "capital": "Ankara", "continent": "Asia"},
    # Africa
    {"country": "Egypt", "capital": "Cairo", "continent": "Africa"},
    {"country": "Kenya", "capital": "Nairobi", "continent": "Africa"},
    {"country": "Nigeria", "capital": "Abuja", "continent": "Africa"},
    {"country": "South Africa", "capital": "Pretoria", "continent": "Africa"},
    {"country": "Morocco", "capital": "Rabat", "continent": "Africa"},
    {"country": "Ethiopia", "capital": "Addis Ababa", "continent": "Africa"},
    {"country": "Ghana", "capital": "Accra", "continent": "Africa"},
    {"country": "Senegal", "capital": "Dakar", "continent": "Africa"},
    {"country": "Algeria", "capital": "Algiers", "continent": "Africa"},
    # North America
    {"country": "United States", "capital": "Washington, D.C.", "continent": "North America"},
    {"country": "Canada", "capital": "Ottawa", "continent": "North America"},
    {"country": "Mexico", "capital": "Mexico City", "continent": "North America"},
    {"country": "Cuba", "capital": "Havana", "continent": "North America"},
    {"country": "Jamaica", "capital": "Kingston", "continent": "North America"},
    # South America
    {"country": "Brazil", "capital": "Brasília", "continent": "South America"},
    {"country": "Argentina", "capital": "Buenos Aires", "continent": "South America"},
    {"country": "Chile", "capital": "Santiago", "continent": "South America"},
    {"country": "Peru", "capital": "Lima", "continent": "South America"},
    {"country": "Colombia", "capital": "Bogotá", "continent": "South America"},
    {"country": "Venezuela", "capital": "Caracas", "continent": "South America"},
    # Oceania
    {"country": "Australia", "capital": "Canberra", "continent": "Oceania"},
    {"country": "New Zealand", "capital": "Wellington", "continent": "Oceania"},
    {"country": "Fiji", "capital": "Suva", "continent": "Oceania"},
]

_EXPECTED_LENGTHS: dict[str, int] = {"DAYS": 7, "MONTHS": 12, "NUMBERS": 20}


def concept_rows() -> list[dict]:
    """Flatten CONCEPTS into one row per (concept, language).

    Each row has the keys ``concept``, ``category``, ``language`` (a code from
    LANGUAGES) and ``word``; rows follow CONCEPTS order, then LANGUAGES order.
    """
    return [
        {
            "concept": entry["concept"],
            "category": entry["category"],
            "language": code,
            "word": entry[code],
        }
        for entry in CONCEPTS
        for code in LANGUAGES
    ]


def validate() -> None:
    """Check that every table is complete; raise ValueError naming the first problem.

    Concepts must have a unique id, a known category and a non-empty word for
    every language; DAYS, MONTHS and NUMBERS must have every language with
    7, 12 and 20 non-empty entries respectively.
    """
    seen: set[str] = set()
    for index, entry in enumerate(CONCEPTS):
        concept = entry.get("concept")
        if not isinstance(concept, str) or not concept.strip():
            raise ValueError(f"CONCEPTS[{index}] has no concept id")
        if concept in seen:
            raise ValueError(f"duplicate concept id {concept!r}")
        seen.add(concept)
        if entry.get("category") not in CATEGORIES:
            raise ValueError(f"concept {concept!r} has unknown category {entry.get('category')!r}")
        for code in LANGUAGES:
            if code not in entry:
                raise ValueError(f"concept {concept!r} lacks language {code!r}")
            word = entry[code]
            if not isinstance(word, str) or not word.strip():
                raise ValueError(f"concept {concept!r} has an empty word for {code!r}")

    tables: dict[str, dict[str, list[str]]] = {"DAYS": DAYS, "MONTHS": MONTHS, "NUMBERS": NUMBERS}
    for name, table in tables.items():
        expected = _EXPECTED_LENGTHS[name]
        for code in LANGUAGES:
            words = table.get(code)
            if words is None:
                raise ValueError(f"{name} lacks language {code!r}")
            if len(words) != expected:
                raise ValueError(f"{name}[{code!r}] has {len(words)} entries, expected {expected}")
            if any(not isinstance(w, str) or not w.strip() for w in words):
                raise ValueError(f"{name}[{code!r}] has an empty entry")
