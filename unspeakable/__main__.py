from unspeakable.engine.cli import main

raise SystemExit(main())
