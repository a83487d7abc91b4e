from engine.cli.common import main

raise SystemExit(main())
